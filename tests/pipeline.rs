//! The whole klein pipeline on the CPU against diffusers' Flux2KleinPipeline (float32): final
//! images within 0.5/255 mean absolute error, intermediates within 1e-4 relative.

mod common;

use std::sync::Arc;

use common::{base_pipeline, fixtures, generate_args, load, mean_pixel_error, pipeline_cases, rel_err, run_cli};
use flux2::backend::cpu::CpuBackend;
use flux2::image_io::RgbImage;
use flux2::model::vae::unpatchify;
use flux2::pipeline::{Pipeline, Request};
use flux2::Backend;

#[test]
fn every_case_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_pipeline(&tmp.path().join("base"));
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let cases = pipeline_cases();
    assert!(cases.len() >= 4);
    for case in cases {
        let root = if case.base { base.clone() } else { fixtures().join("pipeline") };
        let pipe = Pipeline::load(be.clone(), &root).unwrap();
        let prepared = pipe.prepare_references(&case.references).unwrap();
        let req = &case.request;
        let out = pipe.generate(req, None, prepared.as_ref()).unwrap();
        let name = &case.name;
        let expected = case.dir.join("expected.safetensors");

        let want = RgbImage::load(&case.dir.join("expected.png")).unwrap();
        let mad = mean_pixel_error(&out.image, &want);
        assert!(mad <= 0.5, "{name}: mean absolute pixel error {mad}");

        let embeds = pipe.encode(&req.prompt, false).unwrap().context;
        let err = rel_err(&embeds.to_vec_f32().unwrap(), &load(&expected, "prompt_embeds").to_vec_f32().unwrap());
        assert!(err <= 1e-4, "{name}: prompt_embeds error {err}");

        let vae_latents = unpatchify(&*be, &pipe.vae.denormalize(&out.latents).unwrap()).unwrap();
        let err = rel_err(&vae_latents.to_vec_f32().unwrap(), &load(&expected, "latents").to_vec_f32().unwrap());
        assert!(err <= 1e-4, "{name}: final latents error {err}");

        let pixels: Vec<f32> =
            out.pixels.to_vec_f32().unwrap().iter().map(|v| (v * 0.5 + 0.5).clamp(0.0, 1.0)).collect();
        let err = rel_err(&pixels, &load(&expected, "image").to_vec_f32().unwrap());
        assert!(err <= 1e-4, "{name}: decoded image error {err}");
    }
}

#[test]
fn generate_cli_writes_the_reference_image_with_metadata() {
    let case = fixtures().join("cases/t2i_nonsquare");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.png");
    let (pipe, noise) = (fixtures().join("pipeline"), case.join("noise.safetensors"));
    let (ok, stdout, err) = run_cli(&generate_args(
        pipe.to_str().unwrap(),
        &out,
        &[
            "--prompt",
            "a lighthouse on a cliff at dusk",
            "--width",
            "80",
            "--height",
            "48",
            "--noise",
            noise.to_str().unwrap(),
            "--seed",
            "7",
        ],
    ));
    assert!(ok, "{err}");
    assert!(stdout.contains("img.png"));
    let got = RgbImage::load(&out).unwrap();
    assert!(mean_pixel_error(&got, &RgbImage::load(&case.join("expected.png")).unwrap()) <= 0.5);
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap())).read_info().unwrap();
    let texts: Vec<(String, String)> =
        reader.info().uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    let params = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.starts_with("a lighthouse on a cliff at dusk\nSteps: 4"), "{params}");
    // The noise came from the file, so the parameters name it, not the unused --seed.
    assert!(params.contains(&format!("Noise: {}", noise.display())) && params.contains("Size: 80x48"), "{params}");
    assert!(!params.contains("Seed:"), "{params}");
    let json: serde_json::Value = serde_json::from_str(&texts.iter().find(|(k, _)| k == "flux2").unwrap().1).unwrap();
    assert!(json["seed"].is_null());
    assert_eq!(json["noise"], noise.display().to_string());
    assert_eq!(json["steps"], 4);
    assert_eq!(json["width"], 80);
}

#[test]
fn count_makes_one_image_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("many.png");
    let pipe = fixtures().join("pipeline");
    let cat = |out: &std::path::Path, seed_flags: &[&str]| {
        let mut flags = vec!["--prompt", "一只猫", "--width", "32", "--height", "48"];
        flags.extend_from_slice(seed_flags);
        run_cli(&generate_args(pipe.to_str().unwrap(), out, &flags))
    };
    let (ok, stdout, err) = cat(&out, &["--seed", "100", "--count", "3"]);
    assert!(ok, "{err}");
    let files: Vec<&str> = stdout.lines().collect();
    assert_eq!(files.len(), 3);
    let imgs: Vec<RgbImage> =
        (100..103).map(|s| RgbImage::load(&tmp.path().join(format!("many-{s}.png"))).unwrap()).collect();
    assert_ne!(imgs[0].data, imgs[1].data, "different seeds give different images");
    // A seed reproduces its image.
    let single = tmp.path().join("one.png");
    let (ok, _, _) = cat(&single, &["--seed", "101"]);
    assert!(ok);
    assert_eq!(RgbImage::load(&single).unwrap().data, imgs[1].data);
}

#[test]
fn base_model_defaults_to_cfg() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base_pipeline(&tmp.path().join("base"));
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pipe = Pipeline::load(be, &base).unwrap();
    assert!(!pipe.info.is_distilled);
    assert_eq!(pipe.info.defaults(), (50, 4.0));
    let out = pipe
        .generate(
            &Request { prompt: "x".into(), width: Some(16), height: Some(16), steps: Some(2), ..Default::default() },
            None,
            None,
        )
        .unwrap();
    assert_eq!((out.steps, out.guidance), (2, 4.0));
}

/// `--batch N` runs N seeds as one DiT batch; each image equals its single run (the CPU backend
/// computes every row with the same arithmetic), for text-to-image, editing and CFG.
#[test]
fn a_batch_equals_its_single_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let distilled = Pipeline::load(be.clone(), &fixtures().join("pipeline")).unwrap();
    let base = Pipeline::load(be, &base_pipeline(&tmp.path().join("base"))).unwrap();
    let edit = pipeline_cases().into_iter().find(|c| c.name == "edit_one_ref").unwrap();
    let refs = distilled.prepare_references(&edit.references).unwrap();
    let plain = Request {
        prompt: "一只猫".into(),
        width: Some(48),
        height: Some(32),
        steps: Some(3),
        seed: 40,
        ..Default::default()
    };
    let runs: Vec<(&Pipeline, Request, Option<&flux2::pipeline::References>)> = vec![
        (&distilled, plain.clone(), None),
        (
            &distilled,
            Request { prompt: "make it winter".into(), width: None, height: None, ..plain.clone() },
            refs.as_ref(),
        ),
        (&base, Request { guidance: Some(3.0), ..plain.clone() }, None),
    ];
    for (pipe, req, refs) in runs {
        let batch = pipe.generate_batch(&req, 3, None, refs).unwrap();
        assert_eq!(batch.len(), 3);
        for (i, out) in batch.iter().enumerate() {
            let single = pipe.generate(&Request { seed: req.seed + i as u64, ..req.clone() }, None, refs).unwrap();
            let (a, b) = (out.latents.to_vec_f32().unwrap(), single.latents.to_vec_f32().unwrap());
            let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            println!("batch row {i}: max latent difference to the single run {diff:e}");
            assert!(diff <= 1e-5, "image {i}: batched latents differ from the single run by {diff}");
            // Pixels may round the other way where a value sits on a half step.
            let px = out.image.data.iter().zip(&single.image.data).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(px <= 1, "image {i}: a pixel differs by {px}");
        }
        assert_ne!(batch[0].image.data, batch[1].image.data, "seeds differ");
    }
}

#[test]
fn batch_cli_writes_one_file_per_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("b.png");
    let pipe = fixtures().join("pipeline");
    let flags = ["--prompt", "x", "--width", "32", "--height", "32", "--seed", "5", "--batch", "2", "--count", "2"];
    let (ok, stdout, err) = run_cli(&generate_args(pipe.to_str().unwrap(), &out, &flags));
    assert!(ok, "{err}");
    assert_eq!(stdout.lines().count(), 4);
    for s in 5..9 {
        assert!(tmp.path().join(format!("b-{s}.png")).is_file(), "b-{s}.png");
    }
    // The 4th image (second batch, second row) is the single run of seed 8.
    let single = tmp.path().join("s.png");
    let (ok, _, _) = run_cli(&generate_args(
        pipe.to_str().unwrap(),
        &single,
        &["--prompt", "x", "--width", "32", "--height", "32", "--seed", "8"],
    ));
    assert!(ok);
    let (a, b) = (RgbImage::load(&single).unwrap(), RgbImage::load(&tmp.path().join("b-8.png")).unwrap());
    assert!(mean_pixel_error(&a, &b) <= 0.01);
}
