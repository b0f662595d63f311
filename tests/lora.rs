//! LoRA / LoKr / LoHa files of every format against diffusers + peft (and, for LyCORIS, the
//! script's merge from the LyCORIS definition): merged and runtime modes, two LoRAs at once, the
//! CLI end to end, `inspect`, and clean errors on bad files.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{fails_cleanly, fixtures, forward_case, generate_args, load, mean_pixel_error, rel_err, run_cli};
use flux2::backend::cpu::CpuBackend;
use flux2::image_io::RgbImage;
use flux2::lora::{LoraFile, LoraMode, LoraOptions, LoraSpec};
use flux2::model::transformer::{Compute, Flux2Transformer};
use flux2::weights::safetensors::{write_safetensors, TensorEntry};
use flux2::{Backend, DType};

const FORMATS: [&str; 7] = ["bfl", "peft_wrapped", "kohya", "diffusers", "diffusers_old", "lokr", "loha"];

fn lora(name: &str) -> PathBuf {
    fixtures().join("lora").join(format!("{name}.safetensors"))
}

fn case() -> PathBuf {
    fixtures().join("transformer/t2i_nonsquare")
}

fn expected(key: &str) -> Vec<f32> {
    load(&fixtures().join("lora/expected.safetensors"), key).to_vec_f32().unwrap()
}

/// The t2i_nonsquare transformer (`model`: its folder or its BFL single file) with these LoRAs.
fn run(model: &Path, loras: &[(&str, f32)], mode: LoraMode) -> flux2::Result<Vec<f32>> {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let options =
        LoraOptions { loras: loras.iter().map(|(n, s)| LoraSpec { path: lora(n), scale: *s }).collect(), mode };
    let t = Flux2Transformer::load_with_loras(be, model, None, Compute::default(), &options)?;
    let ids = if model.is_dir() { "inputs.safetensors" } else { "ids_int64.safetensors" };
    Ok(forward_case(&t, &case(), ids))
}

#[test]
fn every_format_matches_its_reference_in_both_layouts_and_modes() {
    let base = expected("base");
    for name in FORMATS {
        let want = expected(name);
        // The adapter must move the output well beyond the tolerance, or this test proves nothing.
        assert!(rel_err(&base, &want) > 0.05, "{name}: the reference barely differs from the base model");
        for model in [case(), case().join("bfl.safetensors")] {
            for mode in [LoraMode::Merge, LoraMode::Runtime] {
                let got = run(&model, &[(name, 1.0)], mode).unwrap();
                let err = rel_err(&got, &want);
                println!("{name} on {} ({mode:?}): max relative error {err:.2e}", model.display());
                assert!(err <= 1e-4, "{name} on {} ({mode:?}): max relative error {err}", model.display());
            }
        }
    }
}

#[test]
fn two_loras_with_scales_add_up() {
    let want = expected("two");
    for mode in [LoraMode::Merge, LoraMode::Runtime] {
        let got = run(&case(), &[("bfl", 0.7), ("diffusers", -0.4)], mode).unwrap();
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "{mode:?}: max relative error {err}");
    }
    // One LoRA at 0.7 alone is not the pair: the second one counts.
    let one = run(&case(), &[("bfl", 0.7)], LoraMode::Merge).unwrap();
    assert!(rel_err(&one, &want) > 1e-2);
}

#[test]
fn scale_zero_is_the_base_model() {
    let got = run(&case(), &[("kohya", 0.0)], LoraMode::Merge).unwrap();
    assert!(rel_err(&got, &expected("base")) <= 1e-6);
}

#[test]
fn lora_spec_splits_on_the_last_colon_only_before_a_number() {
    let p = |s: &str| LoraSpec::parse(s).unwrap();
    assert_eq!(p("a.safetensors"), LoraSpec { path: "a.safetensors".into(), scale: 1.0 });
    assert_eq!(p("a.safetensors:0.7"), LoraSpec { path: "a.safetensors".into(), scale: 0.7 });
    assert_eq!(p(r"C:\loras\a.safetensors"), LoraSpec { path: r"C:\loras\a.safetensors".into(), scale: 1.0 });
    assert_eq!(p(r"C:\loras\a.safetensors:-1.5"), LoraSpec { path: r"C:\loras\a.safetensors".into(), scale: -1.5 });
    assert_eq!(
        p("dir:with:colons/a.safetensors"),
        LoraSpec { path: "dir:with:colons/a.safetensors".into(), scale: 1.0 }
    );
    assert!(LoraSpec::parse("a.safetensors:inf").is_err());
    assert!(LoraSpec::parse("a.safetensors:NaN").is_err());
}

/// A LoRA file with `tensors` (name, shape) of small values, in a temp folder.
fn write_lora(dir: &Path, name: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
    let path = dir.join(name);
    let values: Vec<Vec<f32>> = tensors.iter().map(|(_, s)| vec![0.01; s.iter().product()]).collect();
    let entries = tensors.iter().zip(&values).map(|((n, s), v)| TensorEntry::from_f32(n, v, s, DType::F32)).collect();
    write_safetensors(&path, entries, &BTreeMap::new()).unwrap();
    path
}

fn load_error(path: &Path) -> String {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let options = LoraOptions { loras: vec![LoraSpec { path: path.into(), scale: 1.0 }], mode: LoraMode::Merge };
    match Flux2Transformer::load_with_loras(be, &case(), None, Compute::default(), &options) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

const QKV_A: &str = "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight";
const QKV_B: &str = "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight";

#[test]
fn bad_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // A LoRA for another model: the shapes do not fit (hidden 48, not 32).
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let options = LoraOptions { loras: vec![LoraSpec { path: lora("bfl"), scale: 1.0 }], mode: LoraMode::Merge };
    let other = fixtures().join("transformer/batch2_hd24_ref");
    let e =
        Flux2Transformer::load_with_loras(be, &other, None, Compute::default(), &options).err().unwrap().to_string();
    assert!(e.contains("has shape [4, 32], expected [rank, 48]") && e.contains("another model"), "{e}");

    // Keys of no known role, next to valid ones.
    let p = write_lora(t, "unknown.safetensors", &[(QKV_A, &[2, 32]), (QKV_B, &[96, 2]), ("foo.bar", &[1])]);
    let e = load_error(&p);
    assert!(e.contains("`foo.bar`") && e.contains("no LoRA tensor"), "{e}");

    // A module that names no linear of the model (block 9 of 2).
    let p = write_lora(
        t,
        "nomatch.safetensors",
        &[
            ("diffusion_model.double_blocks.9.img_attn.qkv.lora_A.weight", &[2, 32]),
            ("diffusion_model.double_blocks.9.img_attn.qkv.lora_B.weight", &[96, 2]),
        ],
    );
    let e = load_error(&p);
    assert!(e.contains("match no linear") && e.contains("double_blocks.9.img_attn.qkv"), "{e}");

    // Text-encoder keys are named and refused.
    let p = write_lora(
        t,
        "te.safetensors",
        &[
            (QKV_A, &[2, 32]),
            (QKV_B, &[96, 2]),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", &[2, 8]),
        ],
    );
    let e = load_error(&p);
    assert!(e.contains("text-encoder") && e.contains("lora_te1_text_model_encoder_layers_0_mlp_fc1"), "{e}");

    // DoRA and LoKr Tucker cores: refused, not silently dropped.
    let p = write_lora(
        t,
        "dora.safetensors",
        &[(QKV_A, &[2, 32]), (QKV_B, &[96, 2]), ("diffusion_model.double_blocks.0.img_attn.qkv.dora_scale", &[96, 1])],
    );
    assert!(load_error(&p).contains("DoRA"));
    let p = write_lora(
        t,
        "tucker.safetensors",
        &[
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", &[4, 2]),
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_a", &[2, 24]),
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_b", &[2, 16]),
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_t2", &[2, 2, 1, 1]),
        ],
    );
    assert!(load_error(&p).contains("Tucker"));

    // A LoKr whose Kronecker product has the wrong size.
    let p = write_lora(
        t,
        "lokr_bad.safetensors",
        &[
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", &[4, 2]),
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w2", &[20, 16]),
        ],
    );
    let e = load_error(&p);
    assert!(e.contains("kron(w1 [4, 2], w2 [20, 16]) is [80, 32], expected [96, 32]"), "{e}");

    // A safetensors file with no adapter tensor at all.
    let e = LoraFile::open(&case().join("bfl.safetensors")).err().unwrap().to_string();
    assert!(e.contains("not a LoRA file"), "{e}");

    // A truncated file.
    let bytes = std::fs::read(lora("bfl")).unwrap();
    let cut = t.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(LoraFile::open(&cut).is_err());
}

#[test]
fn cli_applies_a_lora_at_a_scale_like_diffusers() {
    let case = fixtures().join("cases/t2i_nonsquare");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.png");
    let pipe = fixtures().join("pipeline");
    let spec = format!("{}:0.7", lora("bfl").display());
    let noise = case.join("noise.safetensors");
    let flags = [
        "--prompt",
        "a lighthouse on a cliff at dusk",
        "--width",
        "80",
        "--height",
        "48",
        "--noise",
        noise.to_str().unwrap(),
        "--lora",
        &spec,
    ];
    let (ok, _, err) = run_cli(&generate_args(pipe.to_str().unwrap(), &out, &flags));
    assert!(ok, "{err}");
    let got = RgbImage::load(&out).unwrap();
    let want = RgbImage::load(&fixtures().join("lora/pipeline_t2i_nonsquare_bfl_0.7.png")).unwrap();
    let mad = mean_pixel_error(&got, &want);
    assert!(mad <= 0.5, "mean absolute pixel error {mad}");
    // And the LoRA visibly changed the image.
    let plain = RgbImage::load(&case.join("expected.png")).unwrap();
    assert!(mean_pixel_error(&got, &plain) > 2.0);

    // Bad LoRA arguments fail before any model loads, naming the file.
    let missing = tmp.path().join("missing.safetensors");
    let spec = format!("{}:0.5", missing.display());
    fails_cleanly(
        &generate_args(pipe.to_str().unwrap(), &out, &["--prompt", "x", "--lora", &spec]),
        &["missing.safetensors"],
    );
    let other = fixtures().join("transformer/batch2_hd24_ref/bfl.safetensors");
    let o = other.to_str().unwrap();
    fails_cleanly(&generate_args(pipe.to_str().unwrap(), &out, &["--prompt", "x", "--lora", o]), &["not a LoRA file"]);
}

#[test]
fn inspect_identifies_lora_files() {
    let (ok, out, err) = run_cli(&["inspect", "--json", lora("kohya").to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "lora");
    assert!(v["format"].as_str().unwrap().contains("kohya"), "{v}");
    assert_eq!(v["ranks"], serde_json::json!([4]));
    assert_eq!(v["alphas"], serde_json::json!(["8"]));
    assert_eq!(v["double_blocks"], serde_json::json!([0, 1]));
    assert_eq!(v["single_blocks"], serde_json::json!([0, 1]));
    assert_eq!(v["text_encoder_keys"], 0);

    let (ok, out, _) = run_cli(&["inspect", "--json", lora("lokr").to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["format"].as_str().unwrap().starts_with("LoKr"), "{v}");
    assert_eq!(v["targets"], 3);

    let (ok, out, _) = run_cli(&["inspect", "--json", lora("diffusers").to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["peft_lora_alpha"], 8.0);
    assert!(v["other_targets"].as_array().unwrap().iter().any(|t| t == "norm_out.linear"), "{v}");

    let (ok, text, _) = run_cli(&["inspect", lora("loha").to_str().unwrap()]);
    assert!(ok && text.contains("kind: lora") && text.contains("LoHa"), "{text}");
}

#[test]
fn runtime_loras_switch_without_reloading() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let spec = |n: &str, s: f32| LoraSpec { path: lora(n), scale: s };
    let options = LoraOptions { loras: vec![spec("bfl", 1.0)], mode: LoraMode::Runtime };
    let mut t = Flux2Transformer::load_with_loras(be.clone(), &case(), None, Compute::default(), &options).unwrap();
    assert!(rel_err(&forward_case(&t, &case(), "inputs.safetensors"), &expected("bfl")) <= 1e-4);
    t.set_runtime_loras(&[spec("kohya", 1.0)]).unwrap();
    assert!(rel_err(&forward_case(&t, &case(), "inputs.safetensors"), &expected("kohya")) <= 1e-4);
    t.set_runtime_loras(&[spec("bfl", 0.7), spec("diffusers", -0.4)]).unwrap();
    assert!(rel_err(&forward_case(&t, &case(), "inputs.safetensors"), &expected("two")) <= 1e-4);
    // A bad file leaves the adapters as they were.
    assert!(t.set_runtime_loras(&[LoraSpec { path: case().join("bfl.safetensors"), scale: 1.0 }]).is_err());
    assert!(rel_err(&forward_case(&t, &case(), "inputs.safetensors"), &expected("two")) <= 1e-4);
    t.set_runtime_loras(&[]).unwrap();
    assert!(rel_err(&forward_case(&t, &case(), "inputs.safetensors"), &expected("base")) <= 1e-6);

    // Merged adapters cannot be switched.
    let merged = LoraOptions { loras: vec![spec("bfl", 1.0)], mode: LoraMode::Merge };
    let mut m = Flux2Transformer::load_with_loras(be, &case(), None, Compute::default(), &merged).unwrap();
    assert!(m.set_runtime_loras(&[]).unwrap_err().to_string().contains("--lora-mode runtime"));
}

#[test]
fn streamed_blocks_see_the_adapters() {
    for mode in [LoraMode::Merge, LoraMode::Runtime] {
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
        let options = LoraOptions { loras: vec![LoraSpec { path: lora("lokr"), scale: 1.0 }], mode };
        let t = Flux2Transformer::load_with_loras(be, &case(), Some(1), Compute::default(), &options).unwrap();
        let err = rel_err(&forward_case(&t, &case(), "inputs.safetensors"), &expected("lokr"));
        assert!(err <= 1e-4, "{mode:?}: {err}");
    }
}

#[test]
fn bfl_final_adaln_lora_is_the_diffusers_one_with_shift_and_scale_swapped() {
    // BFL stores final_layer.adaLN_modulation.1 as (shift, scale), diffusers norm_out.linear as
    // (scale, shift): the same adapter written both ways must give the same model.
    let tmp = tempfile::tempdir().unwrap();
    let (d, r) = (32, 2);
    let down: Vec<f32> = (0..r * d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.05).collect();
    let up: Vec<f32> = (0..2 * d * r).map(|i| ((i * 53 % 13) as f32 - 6.0) * 0.1).collect();
    let swapped: Vec<f32> = [&up[d * r..], &up[..d * r]].concat();
    let write = |name: &str, key: &str, b: &[f32]| {
        let path = tmp.path().join(name);
        let entries = vec![
            TensorEntry::from_f32(&format!("{key}.lora_A.weight"), &down, &[r, d], DType::F32),
            TensorEntry::from_f32(&format!("{key}.lora_B.weight"), b, &[2 * d, r], DType::F32),
        ];
        write_safetensors(&path, entries, &BTreeMap::new()).unwrap();
        path
    };
    let bfl = write("bfl.safetensors", "diffusion_model.final_layer.adaLN_modulation.1", &up);
    let dif = write("dif.safetensors", "transformer.norm_out.linear", &swapped);
    let run_file = |path: PathBuf| {
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
        let options = LoraOptions { loras: vec![LoraSpec { path, scale: 1.0 }], mode: LoraMode::Merge };
        let t = Flux2Transformer::load_with_loras(be, &case(), None, Compute::default(), &options).unwrap();
        forward_case(&t, &case(), "inputs.safetensors")
    };
    let (a, b) = (run_file(bfl), run_file(dif));
    assert!(rel_err(&a, &b) <= 1e-6);
    assert!(rel_err(&a, &expected("base")) > 1e-2, "the adapter must change the output");
}

#[test]
fn fp8_merges_are_requantised_and_their_error_reported() {
    use flux2::model::transformer::AttentionMode;
    use flux2::planner::TransformerPrecision;
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let options = LoraOptions { loras: vec![LoraSpec { path: lora("kohya"), scale: 1.0 }], mode: LoraMode::Merge };
    let compute = Compute { precision: Some(TransformerPrecision::Fp8), attention: AttentionMode::Exact };
    let t = Flux2Transformer::load_with_loras(be, &case(), None, compute, &options).unwrap();
    let got = forward_case(&t, &case(), "inputs.safetensors");
    // W8A8 also rounds activations: the fp8 gate of tests/quantized_compute.rs is 0.999 without
    // a LoRA; this adapter doubles some weights' spread. Far closer to the LoRA than to the base.
    let (cos, _) = common::cosine_and_rel_l2(&got, &expected("kohya"));
    let (cos_base, _) = common::cosine_and_rel_l2(&got, &expected("base"));
    assert!(cos >= 0.995 && cos_base < 0.95, "cosine {cos} to the LoRA reference, {cos_base} to the base");
    let stats = t.lora_merge_stats().unwrap();
    // e4m3 keeps 3 mantissa bits: a requantised weight is off by up to 2^-4 of its row's max.
    assert!(stats.max_rel_err > 1e-3 && stats.max_rel_err < 0.07, "{stats:?}");
    assert!(stats.worst.ends_with("as fp8"), "{stats:?}");
}

#[test]
fn scaled_fp8_checkpoints_are_dequantised_before_the_merge() {
    // The official FP8 layout: block linears as F8_E4M3 with a per-tensor `weight_scale`.
    let src = flux2::weights::WeightStore::open(&case().join("transformer")).unwrap();
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>, DType)> = Vec::new();
    let mut keys: Vec<String> = src.keys().map(str::to_string).collect();
    keys.sort();
    for k in keys {
        let (v, shape) = (src.get(&k).unwrap().to_f32().unwrap(), src.shape(&k).unwrap());
        if shape.len() == 2 && k.contains("blocks.") {
            let scale = v.iter().fold(0f32, |m, x| m.max(x.abs())) / 448.0;
            tensors.push((k.replace(".weight", ".weight_scale"), vec![scale], vec![], DType::F32));
            tensors.push((k, v.iter().map(|x| x / scale).collect(), shape, DType::F8E4M3));
        } else {
            tensors.push((k, v, shape, DType::F32));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tiny-fp8.safetensors");
    let entries = tensors.iter().map(|(n, v, s, d)| TensorEntry::from_f32(n, v, s, *d)).collect();
    write_safetensors(&file, entries, &BTreeMap::new()).unwrap();
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let options = LoraOptions { loras: vec![LoraSpec { path: lora("kohya"), scale: 1.0 }], mode: LoraMode::Merge };
    let t = Flux2Transformer::load_with_loras(be, &file, None, Compute::default(), &options).unwrap();
    let got = forward_case(&t, &case(), "inputs.safetensors");
    let (cos, _) = common::cosine_and_rel_l2(&got, &expected("kohya"));
    let (cos_base, _) = common::cosine_and_rel_l2(&got, &expected("base"));
    assert!(cos >= 0.999 && cos_base < 0.95, "cosine {cos} to the LoRA reference, {cos_base} to the base");
    assert!(t.lora_merge_stats().unwrap().tensors > 0);
}

#[test]
fn serve_refuses_a_bad_lora_before_listening() {
    let pipe = fixtures().join("pipeline");
    let p = pipe.to_str().unwrap();
    let kv = fixtures().join("transformer/t2i_nonsquare/bfl.safetensors");
    fails_cleanly(
        &["serve", "--model", p, "--port", "0", "--device", "cpu", "--lora", kv.to_str().unwrap()],
        &["not a LoRA file"],
    );
}

#[test]
fn peft_metadata_scales_like_peft() {
    // The BFL fixture's factors (rank 4) with a PEFT config: lora_alpha 8 with rsLoRA is a scale
    // of 8/√4 = 4, which `.alpha` keys of 16 (16/4) must reproduce.
    let src = flux2::weights::WeightStore::open(&lora("bfl")).unwrap();
    let mut keys: Vec<String> = src.keys().map(str::to_string).collect();
    keys.sort();
    let tensors: Vec<(String, Vec<f32>, Vec<usize>)> =
        keys.iter().map(|k| (k.clone(), src.get(k).unwrap().to_f32().unwrap(), src.shape(k).unwrap())).collect();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, alpha_keys: bool, meta: Option<&str>| {
        let mut entries: Vec<TensorEntry> =
            tensors.iter().map(|(k, v, s)| TensorEntry::from_f32(k, v, s, DType::F32)).collect();
        let sixteen = [16f32];
        if alpha_keys {
            for k in keys.iter().filter_map(|k| k.strip_suffix(".lora_A.weight")) {
                entries.push(TensorEntry::from_f32(&format!("{k}.alpha"), &sixteen, &[], DType::F32));
            }
        }
        let mut m = BTreeMap::new();
        if let Some(meta) = meta {
            m.insert("lora_adapter_metadata".to_string(), meta.to_string());
        }
        let path = tmp.path().join(name);
        write_safetensors(&path, entries, &m).unwrap();
        path
    };
    let rs = write(
        "rs.safetensors",
        false,
        Some(r#"{"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": true}"#),
    );
    let alpha = write("alpha.safetensors", true, None);
    let run_file = |path: &Path| {
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
        let options = LoraOptions { loras: vec![LoraSpec { path: path.into(), scale: 1.0 }], mode: LoraMode::Merge };
        let t = Flux2Transformer::load_with_loras(be, &case(), None, Compute::default(), &options).unwrap();
        forward_case(&t, &case(), "inputs.safetensors")
    };
    let (a, b) = (run_file(&rs), run_file(&alpha));
    assert!(rel_err(&a, &b) <= 1e-5);
    assert!(rel_err(&a, &expected("bfl")) > 1e-2, "the scale must differ from 1");
    // Per-module alphas are refused, not ignored.
    let pattern =
        write("pattern.safetensors", false, Some(r#"{"lora_alpha": 8, "alpha_pattern": {"img_attn.qkv": 2}}"#));
    assert!(load_error(&pattern).contains("alpha_pattern"));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const PREFIXES: [&str; 7] =
        ["transformer.", "diffusion_model.", "lora_unet_", "base_model.model.", "", "lora_te1_", "lycoris_"];
    const MODULES: [&str; 8] = [
        "double_blocks.0.img_attn.qkv",
        "double_blocks_0_img_attn_qkv",
        "single_blocks.1.linear1",
        "final_layer.adaLN_modulation.1",
        "transformer_blocks.0.attn.to_q",
        "x_embedder",
        "bogus.module",
        "single_blocks.9.linear2",
    ];
    const SUFFIXES: [&str; 17] = [
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_down.weight",
        ".lora_up.weight",
        ".alpha",
        ".lokr_w1",
        ".lokr_w2",
        ".lokr_w1_a",
        ".lokr_w1_b",
        ".lokr_w2_a",
        ".lokr_w2_b",
        ".hada_w1_a",
        ".hada_w1_b",
        ".hada_w2_a",
        ".hada_w2_b",
        ".dora_scale",
        ".weird",
    ];
    const DIMS: [usize; 11] = [0, 1, 2, 3, 4, 8, 16, 24, 32, 96, 288];

    fn name() -> impl Strategy<Value = String> {
        (0..PREFIXES.len(), 0..MODULES.len(), 0..SUFFIXES.len())
            .prop_map(|(p, m, s)| format!("{}{}{}", PREFIXES[p], MODULES[m], SUFFIXES[s]))
    }

    fn shape() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec((0..DIMS.len()).prop_map(|d| DIMS[d]), 0..3)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Any mix of adapter-like keys and shapes loads or fails with an error, in both modes
        /// and in `inspect`; it never panics.
        #[test]
        fn random_adapter_files_never_panic(tensors in prop::collection::btree_map(name(), shape(), 1..8)) {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("fuzz.safetensors");
            let values: Vec<Vec<f32>> = tensors.values().map(|s| vec![0.01; s.iter().product()]).collect();
            let entries = tensors
                .iter()
                .zip(&values)
                .map(|((n, s), v)| TensorEntry::from_f32(n, v, s, DType::F32))
                .collect();
            write_safetensors(&path, entries, &BTreeMap::new()).unwrap();
            let _ = flux2::lora::inspect::report(&path);
            for mode in [LoraMode::Merge, LoraMode::Runtime] {
                let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
                let options = LoraOptions { loras: vec![LoraSpec { path: path.clone(), scale: 0.5 }], mode };
                if let Ok(t) = Flux2Transformer::load_with_loras(be, &case(), None, Compute::default(), &options) {
                    forward_case(&t, &case(), "inputs.safetensors");
                }
            }
        }
    }
}

#[test]
fn forward_cli_takes_loras() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let spec = format!("{}:1", lora("kohya").display());
    let inputs = case().join("inputs.safetensors");
    let (ok, _, err) = run_cli(&[
        "forward",
        "transformer",
        "--model",
        case().to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--timesteps",
        "diffusers-f32",
        "--lora",
        &spec,
        "--lora-mode",
        "runtime",
    ]);
    assert!(ok, "{err}");
    let got = load(&out, "sample").to_vec_f32().unwrap();
    assert!(rel_err(&got, &expected("kohya")) <= 1e-4);
    fails_cleanly(
        &["forward", "vae-decode", "--model", "x", "--inputs", "y", "--out", "z", "--lora", &spec],
        &["--lora applies to the transformer only"],
    );
}

#[test]
fn runtime_adapters_cost_their_factors_on_the_device() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let spec = |n: &str| LoraSpec { path: lora(n), scale: 1.0 };
    let options = LoraOptions { loras: vec![spec("diffusers")], mode: LoraMode::Runtime };
    let mut t = Flux2Transformer::load_with_loras(be, &case(), None, Compute::default(), &options).unwrap();
    // diffusers.safetensors: 10 rank-4 modules, f32 on the CPU, A [4, in] and B [out, 4] each,
    // except to_q and to_k, which share block 0's fused qkv: A [8, 32] stacked, B [96, 8].
    let pair = |out: usize, inp: usize| 4 * inp + out * 4;
    let floats = (8 * 32 + 96 * 8)
        + pair(96, 32) // add_v_proj in the fused txt qkv
        + pair(32, 32) // to_out.0
        + pair(32, 96) // ff_context.linear_out
        + pair(288, 32) // to_qkv_mlp_proj
        + pair(32, 128) // single to_out
        + pair(64, 32) // norm_out.linear
        + pair(16, 32) // proj_out
        + pair(32, 16); // x_embedder
    assert_eq!(t.runtime_lora_bytes(), 4 * floats);
    t.set_runtime_loras(&[]).unwrap();
    assert_eq!(t.runtime_lora_bytes(), 0);
}
