//! The KV scheme (diffusers' Flux2KleinKVPipeline, as the FLUX.2-klein-9b-kv model runs it) on the
//! CPU against diffusers (tests/fixtures/workflows/kv_*): reference K/V from the first step,
//! reused by the later ones; images within 0.5/255 mean absolute error.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{fails_cleanly, fixtures, generate_args, load, mean_pixel_error, rel_err, run_cli};
use flux2::backend::cpu::CpuBackend;
use flux2::image_io::RgbImage;
use flux2::model::vae::unpatchify;
use flux2::pipeline::{Pipeline, Request};
use flux2::Backend;

/// The fixture pipeline as a KV-variant folder: the same components, `model_index.json` naming
/// `Flux2KleinKVPipeline` (which stores no `is_distilled`), as diffusers saves it.
fn kv_pipeline(dir: &Path) -> PathBuf {
    let src = fixtures().join("pipeline");
    std::fs::create_dir_all(dir).unwrap();
    for c in ["tokenizer", "text_encoder", "transformer", "vae", "scheduler"] {
        std::os::unix::fs::symlink(src.join(c), dir.join(c)).unwrap();
    }
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap()).unwrap();
    index["_class_name"] = "Flux2KleinKVPipeline".into();
    index.as_object_mut().unwrap().remove("is_distilled");
    std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn kv_pipeline_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let kv = Pipeline::load(be.clone(), &kv_pipeline(&tmp.path().join("kv"))).unwrap();
    assert!(kv.info.kv && kv.info.is_distilled);
    assert_eq!(kv.info.defaults(), (4, 1.0));
    let plain = Pipeline::load(be.clone(), &fixtures().join("pipeline")).unwrap();
    let cases = common::workflows::cases("kv");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let (name, refs, req) = (&case.name, case.references(), case.request());
        let want = case.expected_image();
        let expected = case.dir.join("expected.safetensors");
        // The KV-variant folder, and --kv-cache on the plain klein folder: the same scheme.
        for (label, pipe, req) in
            [("KV model", &kv, req.clone()), ("--kv-cache", &plain, Request { kv_cache: true, ..req.clone() })]
        {
            let prepared = pipe.prepare_references(&refs).unwrap();
            let out = pipe.generate(&req, None, prepared.as_ref()).unwrap();
            let mad = mean_pixel_error(&out.image, &want);
            let latents = unpatchify(&*be, &pipe.vae.denormalize(&out.latents).unwrap()).unwrap();
            let err = rel_err(&latents.to_vec_f32().unwrap(), &load(&expected, "latents").to_vec_f32().unwrap());
            println!(
                "{name} ({label}): mean absolute pixel error {mad:.5}/255, final latents relative error {err:.2e}"
            );
            assert!(mad <= 0.5, "{name} ({label}): mean absolute pixel error {mad}");
            assert!(err <= 1e-4, "{name} ({label}): final latents error {err}");
        }
        // Without the cache the plain pipeline is the standard editing scheme: another image.
        let prepared = plain.prepare_references(&refs).unwrap();
        let standard = plain.generate(&req, None, prepared.as_ref()).unwrap();
        let latents = unpatchify(&*be, &plain.vae.denormalize(&standard.latents).unwrap()).unwrap();
        let err = rel_err(&latents.to_vec_f32().unwrap(), &load(&expected, "latents").to_vec_f32().unwrap());
        assert!(err > 1e-3, "{name}: the KV scheme should differ from editing (latents {err})");
    }
}

/// The KV scheme batches like the rest: each row equals its single run.
#[test]
fn kv_cache_batches_like_single_runs() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pipe = Pipeline::load(be, &fixtures().join("pipeline")).unwrap();
    let refs = common::workflows::cases("kv").remove(1).references();
    let prepared = pipe.prepare_references(&refs).unwrap();
    let req = Request { prompt: "x".into(), steps: Some(3), seed: 3, kv_cache: true, ..Default::default() };
    let batch = pipe.generate_batch(&req, 2, None, prepared.as_ref()).unwrap();
    for (i, out) in batch.iter().enumerate() {
        let single = pipe.generate(&Request { seed: 3 + i as u64, ..req.clone() }, None, prepared.as_ref()).unwrap();
        let diff = out
            .latents
            .to_vec_f32()
            .unwrap()
            .iter()
            .zip(single.latents.to_vec_f32().unwrap())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5, "row {i}: {diff}");
    }
}

#[test]
fn kv_cache_without_references_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = fixtures().join("pipeline").to_str().unwrap().to_string();
    fails_cleanly(&generate_args(&p, &out, &["--prompt", "x", "--kv-cache"]), &["--kv-cache", "--ref"]);
    // The library says the same.
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pipe = Pipeline::load(be, &fixtures().join("pipeline")).unwrap();
    let req = Request { prompt: "x".into(), width: Some(32), height: Some(32), kv_cache: true, ..Default::default() };
    let err = pipe.generate(&req, None, None).err().unwrap().to_string();
    assert!(err.contains("--kv-cache"), "{err}");
}

#[test]
fn kv_cli_matches_diffusers() {
    let dir = common::workflows::cases("kv").remove(0).dir;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("kv.png");
    let p = fixtures().join("pipeline");
    let (r, noise) = (dir.join("ref0.png"), dir.join("noise.safetensors"));
    let flags = [
        "--prompt",
        "the same scene at night",
        "--ref",
        r.to_str().unwrap(),
        "--noise",
        noise.to_str().unwrap(),
        "--kv-cache",
    ];
    let (ok, _, err) = run_cli(&generate_args(p.to_str().unwrap(), &out, &flags));
    assert!(ok, "{err}");
    let mad = mean_pixel_error(&RgbImage::load(&out).unwrap(), &RgbImage::load(&dir.join("expected.png")).unwrap());
    assert!(mad <= 0.5, "{mad}");
}

#[test]
fn bench_pipeline_reports_the_kv_speedup() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let p = fixtures().join("pipeline");
    let (ok, stdout, err) = run_cli(&[
        "bench",
        "pipeline",
        "--model",
        p.to_str().unwrap(),
        "--width",
        "64",
        "--height",
        "64",
        "--reps",
        "1",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("KV cache, 1 reference(s)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let kv = report["results"].as_array().unwrap().iter().find_map(|r| r.get("kv_cache")).unwrap();
    for key in ["reference_step_ms", "cached_step_ms", "extract_step_ms", "speedup", "cache_bytes"] {
        assert!(kv[key].as_f64().unwrap() > 0.0, "{key}: {kv}");
    }
}
