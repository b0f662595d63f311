//! The checkpoint formats users run, against the reference (scripts/reference/make_format_fixtures.py):
//! GGUF transformers (Q8_0, Q4_K) against diffusers' own GGUF loading, and ComfyUI's quantized
//! files (the official fp8 layout, nvfp4 with per-layer markers, int8 with ConvRot and header
//! markers) against diffusers on comfy-kitchen's dequantisation; then the damaged variants.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{fixtures, load, rel_err};
use flux2::backend::cpu::CpuBackend;
use flux2::model::transformer::Flux2Transformer;
use flux2::weights::WeightStore;
use flux2::Backend;

fn case(name: &str) -> PathBuf {
    fixtures().join("formats").join(name)
}

/// The case's weights file (the one that is not an input, expectation or decoded sample).
fn weights_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".gguf") || n.starts_with("flux-2-klein-tiny")
        })
        .unwrap()
}

fn forward(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let model = Flux2Transformer::load(be, &weights_file(dir)).unwrap();
    let got = common::forward_case(&model, dir, "ids_int64.safetensors");
    (got, load(&dir.join("expected.safetensors"), "sample").to_vec_f32().unwrap())
}

#[test]
fn gguf_transformers_match_diffusers_gguf_loading() {
    for name in ["gguf_q8_0", "gguf_q4_k"] {
        let dir = case(name);
        let (got, diffusers) = forward(&dir);
        // Against diffusers on ggml's exact f32 decoding of the same blocks: the component gate.
        let exact = load(&dir.join("expected.safetensors"), "sample_exact").to_vec_f32().unwrap();
        let err = rel_err(&got, &exact);
        assert!(err <= 1e-4, "{name}: max relative error {err} against the f32-decoded reference");
        // diffusers' own GGUF loading decodes into float16 (`d · q` rounded to 2^-11), which moves
        // its output by about 1e-4 (Q8_0) to 1e-3 (Q4_K): closer than that is all one can ask.
        let err = rel_err(&got, &diffusers);
        assert!(err <= 3e-3, "{name}: max relative error {err} against diffusers' GGUF loading");
    }
}

#[test]
fn comfy_quantized_files_match_the_reference() {
    for name in ["fp8", "nvfp4", "int8"] {
        let (got, want) = forward(&case(name));
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "{name}: max relative error {err}");
    }
}

#[test]
fn comfy_weights_decode_as_comfy_kitchen_does() {
    for (name, prefix) in [("fp8", ""), ("nvfp4", "model.diffusion_model."), ("int8", "")] {
        let dir = case(name);
        let mut store = WeightStore::open(&weights_file(&dir)).unwrap();
        store.set_prefix(prefix);
        let expected = WeightStore::open(&dir.join("dequantized.safetensors")).unwrap();
        for key in expected.keys().map(str::to_string).collect::<Vec<_>>() {
            let want = expected.get(&key).unwrap().to_f32().unwrap();
            let t = store.get(&key).unwrap();
            assert!(!t.is_dense(), "{name} `{key}` should be quantized, is {}", t.encoding.describe());
            let got = t.to_f32().unwrap();
            // fp8 and nvfp4 decode exactly; ConvRot's rotation sums in another order.
            let tol = if name == "int8" { 1e-6 } else { 0.0 };
            let err = rel_err(&got, &want);
            assert!(err <= tol, "{name} `{key}`: max relative error {err}");
        }
    }
}

#[test]
fn inspect_reports_each_files_quantization() {
    for (name, needle) in
        [("gguf_q4_k", "Q4_K"), ("nvfp4", "nvfp4"), ("int8", "int8 rowwise, ConvRot 64"), ("fp8", "fp8 e4m3 (scaled)")]
    {
        let file = weights_file(&case(name));
        let (ok, out, err) = common::run_cli(&["inspect", file.to_str().unwrap(), "--json"]);
        assert!(ok, "{err}");
        assert!(out.contains(needle), "{name}: inspect does not say {needle}: {out}");
        assert!(out.contains("\"kind\": \"transformer\""), "{name}: {out}");
    }
}

/// A safetensors file from (name, dtype string, shape, bytes), with optional header metadata.
fn write_raw_safetensors(path: &Path, tensors: &[(&str, &str, &[usize], Vec<u8>)], metadata: Option<&str>) {
    let mut header = serde_json::Map::new();
    let mut at = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes.len()]}),
        );
        at += bytes.len();
    }
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::json!({ "_quantization_metadata": m }));
    }
    let text = serde_json::Value::Object(header).to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn damaged_quantized_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err_of =
        |path: &Path, key: &str| WeightStore::open(path).unwrap().get(key).map(|_| ()).unwrap_err().to_string();

    // A marker that does not match its tensor: nvfp4 claimed for a bf16 weight.
    let p = tmp.path().join("mismatch.safetensors");
    let marker = br#"{"format": "nvfp4"}"#.to_vec();
    write_raw_safetensors(
        &p,
        &[("l.weight", "BF16", &[2, 16], vec![0; 64]), ("l.comfy_quant", "U8", &[marker.len()], marker)],
        None,
    );
    let e = err_of(&p, "l.weight");
    assert!(e.contains("mismatch.safetensors") && e.contains("`l") && e.contains("BF16"), "{e}");

    // A format we do not read, from the header's layer table.
    let p = tmp.path().join("mxfp8.safetensors");
    write_raw_safetensors(
        &p,
        &[("l.weight", "F8_E4M3", &[2, 32], vec![0; 64])],
        Some(r#"{"layers": {"l": {"format": "mxfp8"}}}"#),
    );
    let e = err_of(&p, "l.weight");
    assert!(e.contains("mxfp8") && e.contains("not supported"), "{e}");

    // NVFP4 block scales of the wrong size.
    let p = tmp.path().join("scales.safetensors");
    let marker = br#"{"format": "nvfp4"}"#.to_vec();
    write_raw_safetensors(
        &p,
        &[
            ("l.weight", "U8", &[2, 8], vec![0; 16]),
            ("l.weight_scale", "F8_E4M3", &[4], vec![0; 4]),
            ("l.weight_scale_2", "F32", &[], 1f32.to_le_bytes().to_vec()),
            ("l.comfy_quant", "U8", &[marker.len()], marker),
        ],
        None,
    );
    let e = err_of(&p, "l.weight");
    assert!(e.contains("weight_scale") && e.contains("512"), "{e}");

    // A scaled fp8 weight whose scale is NaN.
    let p = tmp.path().join("nan.safetensors");
    write_raw_safetensors(
        &p,
        &[
            ("l.weight", "F8_E4M3", &[1, 4], vec![0x38; 4]),
            ("l.weight_scale", "F32", &[], f32::NAN.to_le_bytes().to_vec()),
        ],
        None,
    );
    assert!(err_of(&p, "l.weight").contains("NaN"));

    // A truncated GGUF transformer.
    let src = weights_file(&case("gguf_q8_0"));
    let bytes = std::fs::read(&src).unwrap();
    let p = tmp.path().join("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = WeightStore::open(&p).unwrap_err().to_string();
    assert!(e.contains("truncated.gguf") && e.contains("truncated"), "{e}");
    let out = tmp.path().join("x.png");
    common::fails_cleanly(
        &[
            "generate",
            "--model",
            fixtures().join("pipeline").to_str().unwrap(),
            "--transformer",
            p.to_str().unwrap(),
            "--prompt",
            "p",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["truncated.gguf"],
    );
}

#[test]
fn a_qwen3_gguf_text_encoder_matches_transformers() {
    use flux2::model::qwen3::Qwen3TextEncoder;
    use flux2::model::tokenizer::TokenizedPrompt;
    use flux2::planner::EncoderPrecision;

    let dir = case("qwen3_gguf");
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    // llama.cpp names, config from the GGUF metadata and shapes, Q8_0 blocks decoded at load.
    let encoder =
        Qwen3TextEncoder::load_with(be, &dir.join("qwen3-tiny-Q8_0.gguf"), &[1, 2, 3], EncoderPrecision::Bf16).unwrap();
    assert_eq!(encoder.config().num_hidden_layers, 3);
    let inputs = dir.join("inputs.safetensors");
    let ids = load(&inputs, "input_ids").to_vec_f32().unwrap();
    let mask = load(&inputs, "attention_mask").to_vec_f32().unwrap();
    let prompts: Vec<TokenizedPrompt> = ids
        .chunks(12)
        .zip(mask.chunks(12))
        .map(|(i, m)| {
            let length = m.iter().filter(|&&v| v > 0.0).count();
            TokenizedPrompt {
                ids: i.iter().map(|&v| v as u32).collect(),
                mask: m.iter().map(|&v| v as u8).collect(),
                length,
                untruncated_length: length,
            }
        })
        .collect();
    let got = encoder.forward(&prompts).unwrap().to_vec_f32().unwrap();
    let want = load(&dir.join("expected.safetensors"), "prompt_embeds").to_vec_f32().unwrap();
    // Padded positions are whatever the model computes there; compare the real tokens.
    let width = 3 * 64;
    let real = |v: &[f32]| -> Vec<f32> {
        v.chunks(12 * width).zip(&prompts).flat_map(|(b, p)| b[..p.length * width].to_vec()).collect()
    };
    let err = rel_err(&real(&got), &real(&want));
    assert!(err <= 1e-4, "max relative error {err}");
    let (ok, out, e) = common::run_cli(&["inspect", dir.join("qwen3-tiny-Q8_0.gguf").to_str().unwrap(), "--json"]);
    assert!(ok && out.contains("\"kind\": \"text_encoder\"") && out.contains("\"Q8_0\""), "{e}{out}");
}

#[test]
fn fp8_checkpoints_keep_their_codes_for_fp8_compute() {
    use flux2::model::transformer::layout::{Layout, TransformerWeights};
    // The official fp8 layout: q/k/v apart, one scale each. Concatenated for the fused GEMM, the
    // codes are the stored ones and each row keeps its tensor's scale: no requantization error.
    let dir = case("fp8");
    let (store, layout, cfg) = flux2::model::transformer::open(&weights_file(&dir)).unwrap();
    assert_eq!(layout, Layout::Diffusers);
    let w = TransformerWeights::new(Arc::new(store), layout, &cfg);
    let d = cfg.hidden();
    let names = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight"];
    let q = w.stored_fp8(&names, &[d, d]).unwrap().expect("stored as fp8");
    assert_eq!((q.rows, q.cols), (2 * d, d));
    assert_eq!(flux2::quant::dequantize(&q), w.host_concat(&names, &[d, d]).unwrap());
    // A bf16/f32 checkpoint has no codes to keep.
    let (store, layout, cfg) = flux2::model::transformer::open(&weights_file(&case("gguf_q8_0"))).unwrap();
    let w = TransformerWeights::new(Arc::new(store), layout, &cfg);
    assert!(w.stored_fp8(&["transformer_blocks.0.attn.to_q.weight"], &[cfg.hidden(), cfg.hidden()]).unwrap().is_none());
}

#[test]
fn the_memory_plan_counts_gguf_blocks_at_their_stored_size() {
    use flux2::pipeline::{ComponentFiles, PipelineInfo};
    use flux2::planner::estimate::{transformer_bytes, StoredBytes};
    use flux2::planner::TransformerPrecision;
    let file = weights_file(&case("gguf_q4_k"));
    let files = ComponentFiles { transformer: Some(file.clone()), ..Default::default() };
    let info = PipelineInfo::assemble(Some(&fixtures().join("pipeline")), &files).unwrap();
    let spec = flux2::synth::PipelineSpec::from_info(&info).unwrap();
    // Every block linear of this file is Q4_K: 144 bytes per 256 weights.
    assert!(!spec.stored_blocks.is_empty());
    for (name, bytes) in &spec.stored_blocks {
        let t = flux2::model::transformer::layout::diffusers_tensors(&spec.transformer)
            .into_iter()
            .find(|t| &t.name == name)
            .unwrap();
        assert_eq!(*bytes, t.numel() / 256 * 144, "{name}");
    }
    let bf16 = transformer_bytes(&spec.transformer, TransformerPrecision::Bf16, &StoredBytes::new());
    let stored = transformer_bytes(&spec.transformer, TransformerPrecision::Bf16, &spec.stored_blocks);
    // Exactly the bf16 sizes less what each stored block linear saves.
    // (Only block linears count: the GPU decodes the others to bf16.)
    let saved: usize = spec
        .stored_blocks
        .iter()
        .filter(|(name, _)| name.starts_with("transformer_blocks.") || name.starts_with("single_transformer_blocks."))
        .map(|(name, bytes)| {
            let t = flux2::model::transformer::layout::diffusers_tensors(&spec.transformer)
                .into_iter()
                .find(|t| &t.name == name)
                .unwrap();
            t.numel() * 2 - bytes
        })
        .sum();
    assert_eq!(stored, bf16 - saved);
    assert!(saved > bf16 / 3, "{saved} of {bf16}");
    // A bf16 checkpoint has nothing stored quantized.
    let plain = flux2::synth::PipelineSpec::from_pipeline(&fixtures().join("pipeline")).unwrap();
    assert!(plain.stored_blocks.is_empty() && plain.stored_fp8.is_empty());

    // A scaled-FP8 checkpoint: its block linears at 1 byte a weight plus a row scale, which the CPU's
    // bf16 plan counts (it keeps the codes) and the GPU's does not (it decodes them to bf16).
    let file = weights_file(&case("fp8"));
    let files = ComponentFiles { transformer: Some(file), ..Default::default() };
    let info = PipelineInfo::assemble(Some(&fixtures().join("pipeline")), &files).unwrap();
    let spec = flux2::synth::PipelineSpec::from_info(&info).unwrap();
    assert!(spec.stored_blocks.is_empty() && !spec.stored_fp8.is_empty());
    for (name, bytes) in &spec.stored_fp8 {
        let t = flux2::model::transformer::layout::diffusers_tensors(&spec.transformer)
            .into_iter()
            .find(|t| &t.name == name)
            .unwrap();
        assert_eq!(*bytes, t.numel() + t.shape[0] * 4, "{name}");
    }
    let input = flux2::planner::PlanInput {
        transformer: spec.transformer.clone(),
        text_encoder: spec.text_encoder.clone(),
        vae: spec.vae.clone(),
        transformer_precision: TransformerPrecision::Bf16,
        encoder_precision: flux2::planner::EncoderPrecision::Bf16,
        width: 64,
        height: 64,
        references: vec![],
        cfg: false,
        batch: 1,
        kv_cache: false,
        budget: 1 << 40,
        stored_blocks: spec.stored_blocks.clone(),
        stored_fp8: spec.stored_fp8.clone(),
    };
    use flux2::backend::cpu::CpuPrecision;
    use flux2::planner::Target;
    let gpu = flux2::planner::plan(&input).unwrap().weights.transformer;
    let cpu = flux2::planner::plan_for(&input, Target::Cpu(CpuPrecision::Bf16)).unwrap().weights.transformer;
    let decoded = transformer_bytes(&spec.transformer, TransformerPrecision::Bf16, &StoredBytes::new());
    assert_eq!(gpu, decoded, "the GPU decodes scaled FP8 to bf16");
    assert!(cpu < gpu, "{cpu} vs {gpu}");
}

/// The CPU in bf16 precision at the GPU's gates on every checkpoint format, on each GEMM path this
/// CPU has: scaled-FP8 layers kept as weight-only FP8 codes (`keeps_fp8_codes`), GGUF blocks kept
/// and dequantized in the packing, the rest decoded to bf16 at load.
#[test]
fn checkpoint_formats_in_cpu_bf16_precision() {
    use flux2::backend::cpu::{CpuPrecision, Isa};
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        let be = CpuBackend::with_precision(CpuPrecision::Bf16, isa);
        assert!(be.keeps_fp8_codes());
        eprintln!("{}:", isa.name());
        common::checkpoint_formats_in_bf16(Arc::new(be));
    }
    // The scaled layers of the fp8 fixture are what the weight-only path takes.
    let (store, layout, cfg) = flux2::model::transformer::open(&weights_file(&case("fp8"))).unwrap();
    let w = flux2::model::transformer::layout::TransformerWeights::new(Arc::new(store), layout, &cfg);
    let d = cfg.hidden();
    assert!(w.stored_scaled_fp8(&["transformer_blocks.0.attn.to_q.weight"], &[d, d]).unwrap().is_some());
    assert!(!CpuBackend::new().keeps_fp8_codes(), "the f32 reference decodes at load");
}
