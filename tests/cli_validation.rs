//! Inputs the CLI checks before the long work starts: compare thresholds and NaN outputs, token
//! ids for the text encoder, and synth's configs and free-space check.

mod common;

use std::path::{Path, PathBuf};

use common::{fails_cleanly, fixtures, run_cli};
use flux2::model::transformer::config::TransformerConfig;
use flux2::model::transformer::layout::Layout;
use flux2::synth::{ensure_space, pipeline_bytes, transformer_bytes, PipelineSpec};
use flux2::{DType, Tensor};

fn write(path: &Path, name: &str, values: Vec<f32>) -> PathBuf {
    let n = values.len();
    flux2::cli::write_f32(path, &[(name, &Tensor::from_f32(values, &[n]).unwrap())]).unwrap();
    path.to_path_buf()
}

#[test]
fn compare_rejects_bad_thresholds_and_never_passes_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write(&tmp.path().join("a.safetensors"), "x", vec![1.0, 2.0, 3.0]);
    let (a, a_str) = (a.clone(), a.to_str().unwrap().to_string());
    let (ok, _, err) = run_cli(&["compare", &a_str, &a_str, "--min-cosine", "0.99"]);
    assert!(ok, "{err}");
    for (flag, value) in [
        ("--min-cosine", "NaN"),
        ("--max-rel", "nan"),
        ("--max-rel", "-1"),
        ("--max-ulps", "-0.5"),
        ("--max-pixel-error", "NaN"),
    ] {
        // `--flag=value`: clap would read a bare `-1` as a flag.
        fails_cleanly(&["compare", &a_str, &a_str, &format!("{flag}={value}")], &[flag]);
    }
    // NaN on either side fails, with thresholds or without.
    let nan = write(&tmp.path().join("nan.safetensors"), "x", vec![1.0, f32::NAN, 3.0]);
    let nan = nan.to_str().unwrap();
    fails_cleanly(&["compare", nan, &a_str], &["x: A holds 1 NaN"]);
    fails_cleanly(&["compare", &a_str, nan, "--max-rel", "1e30"], &["x: B holds 1 NaN"]);
    fails_cleanly(&["compare", nan, nan, "--ulps"], &["NaN"]);
    assert!(a.exists());
}

/// An I64 `input_ids` tensor [1, n] and its all-ones attention mask.
fn id_inputs(dir: &Path, ids: &[i64]) -> PathBuf {
    let n = ids.len();
    let header = format!(
        r#"{{"attention_mask":{{"dtype":"I64","shape":[1,{n}],"data_offsets":[0,{}]}},"input_ids":{{"dtype":"I64","shape":[1,{n}],"data_offsets":[{},{}]}}}}"#,
        8 * n,
        8 * n,
        16 * n
    );
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend(std::iter::repeat_n(1i64.to_le_bytes(), n).flatten());
    b.extend(ids.iter().flat_map(|v| v.to_le_bytes()));
    let p = dir.join("ids.safetensors");
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn text_encoder_token_ids_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("pipeline");
    let out = tmp.path().join("out.safetensors");
    let forward = |inputs: &Path| {
        let args = ["forward", "text-encoder", "--model", model.to_str().unwrap(), "--inputs"];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend([inputs.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", "cpu"].map(String::from));
        args
    };
    let check = |ids: &[i64], needle: &str| {
        let args = forward(&id_inputs(tmp.path(), ids));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_cleanly(&args, &["input_ids", needle]);
    };
    check(&[5, -1, 7], "-1");
    check(&[1 << 40], "1099511627776");
    check(&[151669], "151669");
    // Floats must hold whole numbers.
    let floats = tmp.path().join("f2.safetensors");
    let t = Tensor::from_f32(vec![1.0, 2.5], &[1, 2]).unwrap();
    flux2::cli::write_f32(&floats, &[("input_ids", &t)]).unwrap();
    let args = forward(&floats);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_cleanly(&args, &["input_ids", "2.5"]);
    // Valid ids still run.
    let args = forward(&id_inputs(tmp.path(), &[0, 151668, 42]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "{err}");
}

#[test]
fn synth_refuses_configs_without_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline/transformer/config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("num_single_layers");
    v.as_object_mut().unwrap().remove("joint_attention_dim");
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let out = tmp.path().join("out");
    fails_cleanly(
        &["synth", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &["config.json", "num_single_layers", "joint_attention_dim"],
    );
    assert!(!out.exists(), "nothing may be written");
    // A pipeline folder whose VAE config leaves out its channel counts.
    let pipe = tmp.path().join("pipe");
    for sub in ["transformer", "text_encoder", "vae", "scheduler"] {
        std::fs::create_dir_all(pipe.join(sub)).unwrap();
    }
    let src = fixtures().join("pipeline");
    for f in
        ["model_index.json", "transformer/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
    {
        std::fs::copy(src.join(f), pipe.join(f)).unwrap();
    }
    std::fs::write(pipe.join("vae/config.json"), r#"{"_class_name": "AutoencoderKLFlux2", "latent_channels": 4}"#)
        .unwrap();
    fails_cleanly(
        &["synth", "--config", pipe.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &["vae", "block_out_channels"],
    );
}

#[test]
fn synth_estimates_its_output_and_refuses_when_it_cannot_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = PipelineSpec::from_pipeline(&fixtures().join("pipeline")).unwrap();
    let out = tmp.path().join("out");
    let estimate = pipeline_bytes(&spec, DType::BF16, None);
    let (ok, _, err) =
        run_cli(&["synth", "--config", fixtures().join("pipeline").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains(&format!("{estimate} bytes")), "the estimate is printed: {err}");
    fn size(p: &Path) -> u64 {
        if p.is_dir() {
            std::fs::read_dir(p).unwrap().map(|e| size(&e.unwrap().path())).sum()
        } else {
            p.metadata().unwrap().len()
        }
    }
    let written = size(&out);
    assert!(written <= estimate && estimate <= written + written / 5 + (256 << 10), "{written} vs {estimate}");

    // klein-9b in bf16 is about 9 B transformer + 8 B text encoder parameters at 2 bytes each.
    let big = pipeline_bytes(&PipelineSpec::klein_9b(), DType::BF16, None);
    assert!((30e9..40e9).contains(&(big as f64)), "{big}");
    let err = ensure_space(&out, big, Some(1 << 30)).unwrap_err().to_string();
    assert!(err.contains("needs about") && err.contains("1.07 GB"), "{err}");
    ensure_space(&out, big, Some(big)).unwrap();
    ensure_space(&out, big, None).unwrap();
    // Absurd sizes saturate instead of wrapping to something small.
    let huge = TransformerConfig {
        num_attention_heads: 1 << 20,
        attention_head_dim: 1 << 20,
        axes_dims_rope: vec![1 << 18; 4],
        ..TransformerConfig::klein_4b()
    };
    assert!(transformer_bytes(&huge, Layout::Bfl, DType::F32) > 1 << 50);
}
