//! Step previews (`--preview-every`): a linear latent-to-RGB projection fitted to the VAE, applied
//! to the x₀ estimate.

mod common;

use std::sync::Arc;

use common::{fails_cleanly, fixtures, generate_args, run_cli};
use flux2::backend::cpu::CpuBackend;
use flux2::image_io::RgbImage;
use flux2::pipeline::{Pipeline, Request};
use flux2::Backend;

/// The last step's x₀ estimate is the final latents (σ goes to 0), so the last preview is the
/// projection of the final latents; the earlier previews are of the earlier estimates.
#[test]
fn previews_project_the_x0_estimates() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pipe = Pipeline::load(be.clone(), &fixtures().join("pipeline")).unwrap();
    let req = Request {
        prompt: "a lighthouse".into(),
        width: Some(128),
        height: Some(96),
        steps: Some(4),
        seed: 9,
        preview_every: Some(2),
        ..Default::default()
    };
    let out = pipe.generate(&req, None, None).unwrap();
    let steps: Vec<usize> = out.previews.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![2, 4]);
    let fit = pipe.latent_to_rgb().unwrap();
    let (_, last) = out.previews.last().unwrap();
    assert_eq!((last.width, last.height), (16, 12));
    assert_eq!(last.data, fit.apply(&*be, &pipe.vae, &out.latents).unwrap().data);
    assert_ne!(out.previews[0].1.data, last.data);
    // How well a linear map predicts this decoder: the fixtures' VAE is random (GroupNorm-heavy,
    // untrained), so little; printed for the record, not gated.
    let img = &out.image;
    let mut small = vec![0f64; 16 * 12 * 3];
    for y in 0..96 {
        for x in 0..128 {
            for c in 0..3 {
                small[((y / 8) * 16 + x / 8) * 3 + c] += img.data[(y * 128 + x) * 3 + c] as f64 / 64.0;
            }
        }
    }
    let err = small.iter().zip(&last.data).map(|(v, p)| (v - *p as f64).abs()).sum::<f64>() / small.len() as f64;
    println!(
        "latent2rgb on the random fixture VAE: fit R2 {:.3}, last preview vs the image's 8x8 means {err:.1}/255",
        fit.r2
    );
    // Deterministic: the same fit on a second load.
    let again = Pipeline::load(be, &fixtures().join("pipeline")).unwrap().latent_to_rgb().unwrap();
    assert_eq!(again.weights, fit.weights);
}

#[test]
fn generate_writes_previews_and_lists_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.png");
    let json = tmp.path().join("report.json");
    let pipe = fixtures().join("pipeline");
    let flags = [
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "48",
        "--seed",
        "1",
        "--preview-every",
        "2",
        "--json",
        json.to_str().unwrap(),
    ];
    let (ok, _, err) = run_cli(&generate_args(pipe.to_str().unwrap(), &out, &flags));
    assert!(ok, "{err}");
    for step in [2, 4] {
        let p = tmp.path().join(format!("img-preview-{step}.png"));
        let img = RgbImage::load(&p).unwrap();
        assert_eq!((img.width, img.height), (8, 6));
    }
    assert!(!tmp.path().join("img-preview-1.png").exists());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let previews = report["runs"][0]["previews"].as_array().unwrap();
    assert_eq!(previews.len(), 2);
    assert_eq!(previews[1]["step"], 4);
    assert!(previews[1]["image"].as_str().unwrap().ends_with("img-preview-4.png"));
    let p = pipe.to_str().unwrap();
    fails_cleanly(&generate_args(p, &out, &["--prompt", "x", "--preview-every", "0"]), &["--preview-every"]);
}
