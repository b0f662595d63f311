//! Residency plans (evicting models between stages) and the prompt-embedding disk cache.

mod common;

use std::sync::Arc;

use common::{fixtures, generate_args, load, run_cli, run_cli_env};
use flux2::backend::cpu::CpuBackend;
use flux2::pipeline::{LoadOptions, Pipeline, Request, Residency};
use flux2::prompt_cache::PromptCache;
use flux2::{Backend, DType, Tensor};

fn request() -> Request {
    Request {
        prompt: "a lighthouse on a cliff at dusk".into(),
        width: Some(80),
        height: Some(48),
        noise: Some(load(&fixtures().join("cases/t2i_nonsquare/noise.safetensors"), "noise")),
        ..Default::default()
    }
}

#[test]
fn evicting_models_between_stages_changes_nothing_but_residency() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let eager = Pipeline::load(be.clone(), &fixtures().join("pipeline")).unwrap();
    assert_eq!(eager.resident(), (true, true));
    let want = eager.generate(&request(), None, None).unwrap().image;

    let residency = Residency {
        evict_text_encoder_after_encode: true,
        evict_transformer_before_decode: true,
        eager: false,
        decode_tile: None,
        resident_blocks: Some(1),
    };
    let lazy =
        Pipeline::load_with(be, &fixtures().join("pipeline"), LoadOptions { residency, ..Default::default() }).unwrap();
    assert_eq!(lazy.resident(), (false, false), "nothing loads before it is needed");
    let encoded = lazy.encode(&request().prompt, false).unwrap();
    assert_eq!(lazy.resident(), (false, false), "the encoder leaves after encoding");
    let got = lazy.generate(&request(), Some(&encoded), None).unwrap().image;
    assert_eq!(lazy.resident(), (false, false), "the transformer leaves before decoding");
    assert_eq!(got, want);
    // A second image reloads what it needs.
    assert_eq!(lazy.generate(&request(), Some(&encoded), None).unwrap().image, want);
}

#[test]
fn prompt_cache_hits_misses_and_recovers_from_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let p = fixtures().join("pipeline");
    let cache = |settings: &str| {
        PromptCache::new(tmp.path().join("c"), 1 << 20, &p.join("text_encoder"), Some(&p.join("tokenizer")), settings)
            .unwrap()
    };
    let c = cache("bf16");
    assert!(c.get("a cat").is_none());
    let t = Tensor::from_f32((0..24).map(|i| i as f32 * 0.5).collect(), &[1, 2, 12]).unwrap();
    c.put("a cat", &t, DType::F32).unwrap();
    assert_eq!(c.get("a cat").unwrap().to_vec_f32().unwrap(), t.to_vec_f32().unwrap());
    assert!(c.get("a dog").is_none());
    // Other settings (precision, dtype) are another key.
    assert!(cache("int4").get("a cat").is_none());
    // A damaged entry is dropped and reported as a miss.
    let entry = std::fs::read_dir(tmp.path().join("c")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&entry, b"garbage").unwrap();
    assert!(c.get("a cat").is_none());
    assert!(!entry.exists());
    // The folder stays within its bound (1 MiB here; each entry ~3 KiB + header).
    let big = Tensor::from_f32(vec![1.0; 200_000], &[1, 200_000]).unwrap();
    for i in 0..8 {
        c.put(&format!("prompt {i}"), &big, DType::F32).unwrap();
    }
    let total: u64 =
        std::fs::read_dir(tmp.path().join("c")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(total <= 1 << 20, "{total}");
    assert!(c.get("prompt 7").is_some(), "the newest entry survives trimming");
}

#[test]
fn concurrent_writers_leave_one_valid_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let p = fixtures().join("pipeline");
    let t = Tensor::from_f32(vec![3.0; 4096], &[1, 4096]).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let c = PromptCache::new(
                    tmp.path().to_path_buf(),
                    1 << 30,
                    &p.join("text_encoder"),
                    Some(&p.join("tokenizer")),
                    "x",
                )
                .unwrap();
                for _ in 0..5 {
                    c.put("same prompt", &t, DType::F32).unwrap();
                    assert_eq!(c.get("same prompt").unwrap().to_vec_f32().unwrap(), t.to_vec_f32().unwrap());
                }
            });
        }
    });
    let files: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
}

#[test]
fn generate_uses_the_cache_and_honours_a_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let noise = fixtures().join("cases/t2i_nonsquare/noise.safetensors");
    let pipeline = fixtures().join("pipeline");
    let cache = tmp.path().join("cache");
    let run = |extra: &[&str]| {
        let mut flags = vec!["--prompt", "a lighthouse on a cliff at dusk", "--noise", noise.to_str().unwrap()];
        flags.extend_from_slice(extra);
        run_cli_env(&generate_args(pipeline.to_str().unwrap(), &out, &flags), &[("FLUX2_CACHE_DIR", &cache)])
    };
    for _ in 0..2 {
        let (ok, _, err) = run(&["--vram-budget", "1GiB"]);
        assert!(ok, "{err}");
        assert!(err.contains("memory plan"));
        let got = flux2::image_io::RgbImage::load(&out).unwrap();
        assert_eq!(got, flux2::image_io::RgbImage::load(&fixtures().join("cases/t2i_nonsquare/expected.png")).unwrap());
    }
    assert_eq!(std::fs::read_dir(cache.join("prompt-embeds")).unwrap().count(), 1);
    let (ok, _, err) = run(&["--vram-budget", "1MiB"]);
    assert!(!ok);
    assert!(err.contains("smallest budget"));
    let (ok, _, _) =
        run_cli(&generate_args(pipeline.to_str().unwrap(), &out, &["--prompt", "x", "--vram-budget", "lots"]));
    assert!(!ok);
}

#[test]
fn generate_plans_for_the_size_it_renders() {
    // Without --width/--height the noise sets the size (80x48): the plan must be the one
    // `flux2 plan` makes for that size, not for the 1024x1024 default.
    let tmp = tempfile::tempdir().unwrap();
    let (out, report) = (tmp.path().join("o.png"), tmp.path().join("report.json"));
    let pipeline = fixtures().join("pipeline");
    let p = pipeline.to_str().unwrap();
    let noise = fixtures().join("cases/t2i_nonsquare/noise.safetensors");
    let flags = ["--prompt", "x", "--noise", noise.to_str().unwrap(), "--vram-budget", "1GiB"];
    let (ok, _, err) = run_cli(&[generate_args(p, &out, &flags), vec!["--json", report.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let plan_peak = |w: &str, h: &str| {
        let args = [
            "plan",
            "--config",
            p,
            "--vram-budget",
            "1GiB",
            "--width",
            w,
            "--height",
            h,
            "--json",
            "--device",
            "cpu",
            "--cpu-precision",
            "f32",
        ];
        let (ok, stdout, err) = run_cli(&args);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["peak"].clone()
    };
    assert_eq!(report["plan"]["peak"], plan_peak("80", "48"));
    assert_ne!(report["plan"]["peak"], plan_peak("1024", "1024"));
}

#[test]
fn the_vae_encoder_loads_only_for_references() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pipe = Pipeline::load(be, &fixtures().join("pipeline")).unwrap();
    let req = Request { prompt: "x".into(), width: Some(16), height: Some(16), steps: Some(1), ..Default::default() };
    pipe.generate(&req, None, None).unwrap();
    assert!(!pipe.vae_encoder_loaded(), "text-to-image must not load the VAE encoder");
    let reference = flux2::image_io::RgbImage { width: 64, height: 64, data: vec![100; 64 * 64 * 3] };
    assert!(pipe.prepare_references(&[reference]).unwrap().is_some());
    assert!(pipe.vae_encoder_loaded());
}

#[test]
fn tiled_decode_covers_the_image_and_stays_close() {
    use flux2::model::vae::{Vae, VaeParts};
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let vae =
        Vae::load(be.clone(), &fixtures().join("pipeline/vae"), VaeParts { encoder: true, decoder: true }).unwrap();
    let z = Tensor::from_f32(flux2::rng::normal_vec(4, "z", 4 * 24 * 40), &[1, 4, 24, 40]).unwrap();
    let whole = vae.decode(&z).unwrap().to_vec_f32().unwrap();
    // A tile as large as the image is the one-piece decode.
    assert_eq!(vae.decode_tiled(&z, 1024).unwrap().to_vec_f32().unwrap(), whole);
    let tiled = vae.decode_tiled(&z, 128).unwrap();
    assert_eq!(tiled.shape(), &[1, 3, 192, 320]);
    let t = tiled.to_vec_f32().unwrap();
    assert!(t.iter().all(|v| v.is_finite()));
    let (cos, _) = common::cosine_and_rel_l2(&t, &whole);
    println!("tiled vs whole: cosine {cos:.4}");
    assert!(cos > 0.9, "tiles should approximate the whole decode: cosine {cos}");
}

#[test]
fn streamed_blocks_give_the_same_transformer() {
    use flux2::model::transformer::Flux2Transformer;
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let dir = fixtures().join("transformer/batch2_hd24_ref");
    let run = |blocks: Option<usize>| {
        let m = Flux2Transformer::load_streaming(be.clone(), &dir.join("bfl.safetensors"), blocks).unwrap();
        common::forward_case(&m, &dir, "inputs.safetensors")
    };
    let resident = run(None);
    for k in [0, 2, 4] {
        assert_eq!(run(Some(k)), resident, "{k} resident blocks");
    }
}

#[test]
fn streamed_fp8_blocks_match_resident_ones_at_every_step() {
    use flux2::model::transformer::{AttentionMode, Compute, Flux2Transformer};
    use flux2::planner::TransformerPrecision;
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let dir = fixtures().join("transformer/batch2_hd24_ref");
    let fp8 = Compute { precision: Some(TransformerPrecision::Fp8), attention: AttentionMode::Exact };
    let load = |blocks| Flux2Transformer::load_with(be.clone(), &dir.join("bfl.safetensors"), blocks, fp8).unwrap();
    let resident = common::forward_case(&load(None), &dir, "inputs.safetensors");
    let streamed = load(Some(1));
    // The first forward quantizes the streamed blocks, the second reuses their kept codes.
    for step in 0..2 {
        assert_eq!(common::forward_case(&streamed, &dir, "inputs.safetensors"), resident, "forward {step}");
    }
}

#[test]
fn a_cache_entry_of_the_wrong_shape_is_deleted_and_recomputed() {
    let tmp = tempfile::tempdir().unwrap();
    let p = fixtures().join("pipeline");
    let cache =
        || PromptCache::new(tmp.path().join("c"), 1 << 20, &p.join("text_encoder"), Some(&p.join("tokenizer")), "x");
    let wrong = Tensor::from_f32(vec![0.25; 36], &[1, 3, 12]).unwrap();
    cache().unwrap().put("a cat", &wrong, DType::F32).unwrap();
    // The right prompt, the wrong shape (another build, a damaged write): a miss, and deleted.
    let strict = cache().unwrap().expecting(&[1, 2, 12], DType::F32);
    assert!(strict.get("a cat").is_none());
    assert_eq!(std::fs::read_dir(tmp.path().join("c")).unwrap().count(), 0, "the bad entry must be deleted");
    // The right shape but stored as bf16 where f32 is expected is refused too.
    let right = Tensor::from_f32(vec![0.25; 24], &[1, 2, 12]).unwrap();
    cache().unwrap().put("a cat", &right, DType::BF16).unwrap();
    assert!(strict.get("a cat").is_none());
    strict.put("a cat", &right, DType::F32).unwrap();
    assert_eq!(strict.get("a cat").unwrap().to_vec_f32().unwrap(), right.to_vec_f32().unwrap());
}

#[test]
fn generate_replaces_a_bad_cache_entry_and_says_which_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let pipeline = fixtures().join("pipeline");
    let cache = tmp.path().join("cache");
    let run = || {
        let flags = ["--prompt", "a bad entry", "--width", "32", "--height", "32", "--seed", "1"];
        run_cli_env(&generate_args(pipeline.to_str().unwrap(), &out, &flags), &[("FLUX2_CACHE_DIR", &cache)])
    };
    let (ok, _, err) = run();
    assert!(ok, "{err}");
    let first = std::fs::read(&out).unwrap();
    let entry = std::fs::read_dir(cache.join("prompt-embeds")).unwrap().next().unwrap().unwrap().path();
    // Same prompt (metadata), wrong shape.
    let meta = std::collections::BTreeMap::from([("prompt".to_string(), "a bad entry".to_string())]);
    let values = vec![0.5f32; 10];
    flux2::weights::safetensors::write_safetensors(
        &entry,
        vec![flux2::weights::safetensors::TensorEntry::from_f32("prompt_embeds", &values, &[1, 10], DType::F32)],
        &meta,
    )
    .unwrap();
    let (ok, _, err) = run();
    assert!(ok, "{err}");
    assert!(err.contains("prompt cache") && err.contains("prompt-embeds") && err.contains("deleted"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), first, "the recomputed embedding gives the same image");
    // The entry was rewritten with the right shape: the next run is silent.
    let (ok, _, err) = run();
    assert!(ok, "{err}");
    assert!(!err.contains("unusable"), "{err}");
}
