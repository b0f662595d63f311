//! Built-in configs match the real parameter counts (spec §8.2); synthetic checkpoints load in
//! both layouts and hold the same model.

mod common;

use std::sync::Arc;

use common::{fixtures, rel_err};
use flux2::backend::cpu::CpuBackend;
use flux2::model::rope::PositionIds;
use flux2::model::transformer::config::TransformerConfig;
use flux2::model::transformer::layout::{bfl_tensors, diffusers_tensors, Layout};
use flux2::model::transformer::Flux2Transformer;
use flux2::{Backend, DType, Tensor};

fn params(specs: impl Iterator<Item = Vec<usize>>) -> usize {
    specs.map(|s| s.iter().product::<usize>()).sum()
}

#[test]
fn klein_parameter_counts_match_the_spec() {
    let c4 = TransformerConfig::klein_4b();
    let c9 = TransformerConfig::klein_9b();
    assert_eq!(params(diffusers_tensors(&c4).into_iter().map(|t| t.shape)), 3_875_544_576);
    assert_eq!(params(diffusers_tensors(&c9).into_iter().map(|t| t.shape)), 9_078_581_248);
    // The BFL layout holds the same parameters in fewer tensors (149 / 201).
    assert_eq!(params(bfl_tensors(&c4).into_iter().map(|t| t.0.shape)), 3_875_544_576);
    assert_eq!(bfl_tensors(&c4).len(), 149);
    assert_eq!(bfl_tensors(&c9).len(), 201);
    // Per-block counts: 26·D² + 4·128 and 13·D² + 2·128.
    let block = |c: &TransformerConfig, prefix: &str| {
        params(diffusers_tensors(c).into_iter().filter(|t| t.name.starts_with(prefix)).map(|t| t.shape))
    };
    assert_eq!(block(&c4, "transformer_blocks.0."), 245_367_296);
    assert_eq!(block(&c4, "single_transformer_blocks.0."), 122_683_648);
    assert_eq!(block(&c9, "transformer_blocks.0."), 436_208_128);
    assert_eq!(block(&c9, "single_transformer_blocks.0."), 218_104_064);
    assert_eq!((c4.hidden(), c4.mlp_hidden(), c9.hidden(), c9.mlp_hidden()), (3072, 9216, 4096, 12288));
}

#[test]
fn synthetic_layouts_hold_the_same_model() {
    let cfg =
        TransformerConfig::from_json_file(&fixtures().join("transformer/batch2_hd24_ref/transformer/config.json"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    flux2::synth::write_transformer(&cfg, Layout::Diffusers, DType::BF16, 5, dir.path(), "x.safetensors").unwrap();
    flux2::synth::write_transformer(&cfg, Layout::Bfl, DType::BF16, 5, dir.path(), "bfl.safetensors").unwrap();
    flux2::synth::write_transformer(&cfg, Layout::Bfl, DType::BF16, 6, dir.path(), "other_seed.safetensors").unwrap();

    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let (h, w, lt) = (3, 2, 4);
    let x = Tensor::from_f32(flux2::rng::normal_vec(1, "x", h * w * cfg.in_channels), &[1, h * w, cfg.in_channels])
        .unwrap();
    let ctx = Tensor::from_f32(
        flux2::rng::normal_vec(1, "c", lt * cfg.joint_attention_dim),
        &[1, lt, cfg.joint_attention_dim],
    )
    .unwrap();
    let run = |path: &std::path::Path| {
        let m = Flux2Transformer::load(be.clone(), path).unwrap();
        m.forward(&x, &ctx, &[600.0], &PositionIds::image(0.0, h, w), &PositionIds::text(lt), None)
            .unwrap()
            .to_vec_f32()
            .unwrap()
    };
    let a = run(dir.path());
    let b = run(&dir.path().join("bfl.safetensors"));
    let c = run(&dir.path().join("other_seed.safetensors"));
    assert_eq!(a, b, "diffusers and BFL files from one seed must be the same model");
    assert!(rel_err(&a, &c) > 1e-2, "a different seed must give a different model");
    assert!(a.iter().all(|v| v.is_finite()));
}

#[test]
fn vae_and_text_encoder_tensor_lists_match_real_checkpoints() {
    use flux2::model::{qwen3, vae};
    use flux2::weights::WeightStore;
    // The tiny fixture checkpoints were written by diffusers / transformers.
    for (specs, dir, skip) in [
        (
            vae::tensors(&vae::VaeConfig::from_json_file(&fixtures().join("pipeline/vae/config.json")).unwrap()),
            "pipeline/vae",
            "num_batches_tracked",
        ),
        (
            qwen3::tensors(
                &qwen3::Qwen3Config::from_json_file(&fixtures().join("pipeline/text_encoder/config.json")).unwrap(),
            ),
            "pipeline/text_encoder",
            "\0",
        ),
    ] {
        let store = WeightStore::open(&fixtures().join(dir)).unwrap();
        let mut stored: Vec<(String, Vec<usize>)> =
            store.keys().filter(|k| !k.contains(skip)).map(|k| (k.to_string(), store.shape(k).unwrap())).collect();
        let mut ours: Vec<(String, Vec<usize>)> = specs.into_iter().map(|t| (t.name, t.shape)).collect();
        stored.sort();
        ours.sort();
        assert_eq!(ours, stored, "{dir}");
    }
    // Real sizes (spec §8.2): VAE 84,046,115 parameters plus the 2×128 BatchNorm statistics.
    let count = |v: Vec<flux2::weights::TensorSpec>| v.iter().map(|t| t.numel()).sum::<usize>();
    assert_eq!(count(vae::tensors(&vae::VaeConfig::default())), 84_046_115 + 256);
    assert_eq!(count(qwen3::tensors(&qwen3::Qwen3Config::qwen3_4b())), 4_022_468_096);
    assert_eq!(count(qwen3::tensors(&qwen3::Qwen3Config::qwen3_8b())), 8_190_735_360);
}

#[test]
fn synthetic_pipeline_generates_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe");
    let (ok, _, err) = common::run_cli(&[
        "synth",
        "--config",
        fixtures().join("pipeline").to_str().unwrap(),
        "--seed",
        "9",
        "--out",
        pipe.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let out = dir.path().join("x.png");
    let (ok, _, err) = common::run_cli(&common::generate_args(
        pipe.to_str().unwrap(),
        &out,
        &["--prompt", "a test", "--width", "32", "--height", "16", "--seed", "2"],
    ));
    assert!(ok, "{err}");
    let img = flux2::image_io::RgbImage::load(&out).unwrap();
    assert_eq!((img.width, img.height), (32, 16));
    // The byte-level stand-in tokenizer encodes text one byte per token around the template.
    let tok = flux2::model::tokenizer::PromptTokenizer::load(&pipe.join("tokenizer")).unwrap();
    let t = tok.encode_prompt("ab", 512).unwrap();
    assert_eq!(&t.ids[..5], &[151644, b'u' as u32, b's' as u32, b'e' as u32, b'r' as u32]);
}
