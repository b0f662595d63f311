//! Inpainting and img2img on the CPU against diffusers' Flux2KleinInpaintPipeline (float32,
//! tests/fixtures/workflows/*, made by scripts/reference/make_fixtures.py --only workflows): the
//! images within 0.5/255 mean absolute error, the final latents within 1e-4 relative.

mod common;

use std::sync::Arc;

use common::workflows::cases;
use common::{fails_cleanly, fixtures, generate_args, load, mean_pixel_error, rel_err, run_cli};
use flux2::backend::cpu::CpuBackend;
use flux2::image_io::RgbImage;
use flux2::model::vae::unpatchify;
use flux2::pipeline::{Pipeline, Request};
use flux2::Backend;

#[test]
fn inpaint_and_img2img_match_diffusers() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pipe = Pipeline::load(be.clone(), &fixtures().join("pipeline")).unwrap();
    let cases = cases("inpaint");
    assert!(cases.len() >= 4, "{} inpaint cases", cases.len());
    for case in cases {
        let prepared = pipe.prepare_references(&case.references()).unwrap();
        let out = pipe.generate(&case.request(), None, prepared.as_ref()).unwrap();
        let name = &case.name;
        let want = RgbImage::load(&case.dir.join("expected.png")).unwrap();
        let mad = mean_pixel_error(&out.image, &want);
        println!("{name}: mean absolute pixel error {mad:.5}/255");
        assert!(mad <= 0.5, "{name}: mean absolute pixel error {mad}");
        let expected = case.dir.join("expected.safetensors");
        if expected.is_file() {
            let vae_latents = unpatchify(&*be, &pipe.vae.denormalize(&out.latents).unwrap()).unwrap();
            let err = rel_err(&vae_latents.to_vec_f32().unwrap(), &load(&expected, "latents").to_vec_f32().unwrap());
            println!("{name}: final latents relative error {err:.2e}");
            assert!(err <= 1e-4, "{name}: final latents error {err}");
        }
    }
}

/// img2img is the reference run with an all-white mask: the same image without `--mask`.
#[test]
fn img2img_without_a_mask_equals_an_all_white_mask() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let pipe = Pipeline::load(be, &fixtures().join("pipeline")).unwrap();
    let case = cases("inpaint").into_iter().find(|c| c.name == "img2img").unwrap();
    let req = case.request();
    assert!(req.mask.is_none());
    let plain = pipe.generate(&req, None, None).unwrap();
    let init = req.init_image.clone().unwrap();
    let white = RgbImage { width: init.width, height: init.height, data: vec![255; init.data.len()] };
    let masked = pipe.generate(&Request { mask: Some(white), ..req }, None, None).unwrap();
    assert_eq!(plain.image.data, masked.image.data);
    assert_eq!(plain.steps, 2, "strength 0.5 of 4 steps runs 2");
}

#[test]
fn generate_cli_inpaints_as_diffusers() {
    let case = fixtures().join("workflows/inpaint_mask");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("inpaint.png");
    let pipe = fixtures().join("pipeline");
    let path = |n: &str| case.join(n).to_str().unwrap().to_string();
    let (init, mask, noise) = (path("init.png"), path("mask.png"), path("noise.safetensors"));
    let flags = [
        "--prompt",
        "a red door",
        "--init-image",
        &init,
        "--mask",
        &mask,
        "--strength",
        "0.6",
        "--noise",
        &noise,
        "--seed",
        "3",
    ];
    let (ok, stdout, err) = run_cli(&generate_args(pipe.to_str().unwrap(), &out, &flags));
    assert!(ok, "{err}");
    assert!(stdout.contains("inpaint.png"));
    let got = RgbImage::load(&out).unwrap();
    assert_eq!((got.width, got.height), (64, 48), "the size defaults to the init image's (floored to 16)");
    assert!(mean_pixel_error(&got, &RgbImage::load(&case.join("expected.png")).unwrap()) <= 0.5);
}

#[test]
fn bad_inpainting_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = fixtures().join("pipeline").to_str().unwrap().to_string();
    let case = fixtures().join("workflows/inpaint_mask");
    let init = case.join("init.png").to_str().unwrap().to_string();
    let other = fixtures().join("workflows/img2img/init.png").to_str().unwrap().to_string();
    let not_image = tmp.path().join("mask.png");
    std::fs::write(&not_image, b"this is not a PNG").unwrap();
    let not_image = not_image.to_str().unwrap().to_string();
    let run = |flags: &[&str], needles: &[&str]| {
        let mut all = vec!["--prompt", "x"];
        all.extend_from_slice(flags);
        fails_cleanly(&generate_args(&p, &out, &all), needles);
    };
    run(&["--init-image", &init, "--strength", "0"], &["--strength", "(0, 1]"]);
    run(&["--init-image", &init, "--strength", "1.5"], &["--strength", "(0, 1]"]);
    run(&["--init-image", &init, "--strength", "nan"], &["--strength"]);
    run(&["--init-image", &init, "--mask", &other], &["--mask", "64x64", "70x52"]);
    run(&["--init-image", &init, "--mask", &not_image], &["--mask", "cannot decode"]);
    run(&["--init-image", &not_image], &["--init-image", "cannot decode"]);
    run(&["--strength", "0.5"], &["--strength", "--init-image"]);
    run(&["--mask", &init], &["--mask", "--init-image"]);
    run(&["--init-image", &init, "--mask-crop", "8"], &["--mask-crop", "--mask"]);
    run(&["--init-image", &init, "--strength", "1e-17", "--steps", "4"], &["--strength", "no step"]);
}
