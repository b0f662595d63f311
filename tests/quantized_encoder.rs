//! Weight-only quantized text encoders (int8, int4, fp8) against bf16, on Qwen3-4B layer shapes
//! with heavy-tailed weights and outlier activation channels: context cosine similarity must stay
//! ≥ 0.999 (int8, fp8) and ≥ 0.99 (int4).

mod common;

use std::sync::Arc;

use common::cosine_and_rel_l2;
use flux2::backend::cpu::CpuBackend;
use flux2::model::qwen3::{self, Qwen3Config, Qwen3TextEncoder};
use flux2::model::tokenizer::TokenizedPrompt;
use flux2::planner::EncoderPrecision;
use flux2::weights::safetensors::{write_safetensors, TensorEntry};
use flux2::{Backend, DType};

/// Real Qwen3-4B layer shapes, two layers, a small vocabulary.
fn config() -> Qwen3Config {
    Qwen3Config { vocab_size: 2048, num_hidden_layers: 2, ..Qwen3Config::qwen3_4b() }
}

/// Heavy tails: one weight in 500 is 8x larger. Outlier channels: 6 embedding channels 25x larger.
fn values(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let key = flux2::rng::stream_key(11, name);
    let fan_in = *shape.last().unwrap() as f32;
    (0..n)
        .map(|i| {
            let z = flux2::rng::normal(key, i as u64);
            if shape.len() == 1 {
                1.0 + 0.1 * z
            } else if name.contains("embed") {
                let ch = i % shape[1];
                z * if [7, 100, 555, 1234, 2000, 2501].contains(&ch) { 25.0 } else { 1.0 }
            } else {
                let spike = flux2::rng::uniform(key ^ 0x5a5a, i as u64) < 0.002;
                z / fan_in.sqrt() * if spike { 8.0 } else { 1.0 }
            }
        })
        .collect()
}

#[test]
fn quantized_encoders_stay_close_to_bf16() {
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    let specs = qwen3::tensors(&cfg);
    let data: Vec<(String, Vec<f32>, Vec<usize>)> =
        specs.iter().map(|t| (t.name.clone(), values(&t.name, &t.shape), t.shape.clone())).collect();
    let entries = data.iter().map(|(n, v, s)| TensorEntry::from_f32(n, v, s, DType::BF16)).collect();
    write_safetensors(&dir.path().join("model.safetensors"), entries, &Default::default()).unwrap();
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();

    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let ids: Vec<u32> = (0..48u32).map(|i| (i * 37 + 5) % 2048).collect();
    let mut mask = vec![1u8; 48];
    mask[40..].fill(0);
    let tokens = [TokenizedPrompt { ids, mask, length: 40, untruncated_length: 40 }];
    let out_layers = [1, 2];
    let run = |p: EncoderPrecision| {
        let enc = Qwen3TextEncoder::load_with(be.clone(), dir.path(), &out_layers, p).unwrap();
        enc.forward(&tokens).unwrap().to_vec_f32().unwrap()
    };
    let reference = run(EncoderPrecision::Bf16);
    for (p, gate) in [(EncoderPrecision::Int8, 0.999), (EncoderPrecision::Fp8, 0.999), (EncoderPrecision::Int4, 0.99)] {
        let (cos, rel) = cosine_and_rel_l2(&run(p), &reference);
        println!("{p:?}: cosine {cos:.6}, rel_l2 {rel:.4}");
        assert!(cos >= gate, "{p:?}: cosine {cos} below {gate}");
        assert!(cos < 1.0 - 1e-9, "{p:?} must actually quantize");
    }
}
