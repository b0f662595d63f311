//! `flux2 generate` on bad input: a clear error and a non-zero exit, never a panic.

mod common;

use common::{fails_cleanly, fixtures, generate_args, run_cli, run_cli_env};

fn pipeline() -> String {
    fixtures().join("pipeline").to_str().unwrap().to_string()
}

#[test]
fn sizes_must_be_multiples_of_16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = pipeline();
    let sized = |w| generate_args(&p, &out, &["--prompt", "x", "--width", w, "--height", "64"]);
    fails_cleanly(&sized("100"), &["multiples of 16", "96x64"]);
    fails_cleanly(&sized("0"), &["multiples of 16"]);
    // Absurd sizes are refused before any work (they aborted on an allocation or ran for minutes).
    fails_cleanly(&sized("4294967312"), &["larger than flux2 generates"]);
    fails_cleanly(&sized("1000000000"), &["larger than flux2 generates"]);
}

#[test]
fn missing_components_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let broken = tmp.path().join("pipe");
    std::fs::create_dir_all(broken.join("tokenizer")).unwrap();
    std::fs::create_dir_all(broken.join("transformer")).unwrap();
    std::fs::create_dir_all(broken.join("vae")).unwrap();
    std::fs::copy(fixtures().join("pipeline/model_index.json"), broken.join("model_index.json")).unwrap();
    fails_cleanly(&generate_args(broken.to_str().unwrap(), &out, &["--prompt", "x"]), &["text_encoder"]);
    // A folder that is not a pipeline at all.
    fails_cleanly(&generate_args(tmp.path().to_str().unwrap(), &out, &["--prompt", "x"]), &["model_index.json"]);
}

#[test]
fn repo_id_not_in_cache_says_how_to_download() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let args = generate_args("black-forest-labs/FLUX.2-klein-4B", &out, &["--prompt", "x"]);
    let (ok, _, err) = run_cli_env(&args, &[("HF_HUB_CACHE", tmp.path())]);
    assert!(!ok);
    assert!(err.contains("hf download black-forest-labs/FLUX.2-klein-4B"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn repo_id_in_cache_resolves() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("models--org--tiny/snapshots/abc123");
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(fixtures().join("pipeline"), &snap).unwrap();
    std::fs::create_dir_all(tmp.path().join("models--org--tiny/refs")).unwrap();
    std::fs::write(tmp.path().join("models--org--tiny/refs/main"), "abc123").unwrap();
    let out = tmp.path().join("o.png");
    let args = generate_args("org/tiny", &out, &["--prompt", "x", "--width", "16", "--height", "16", "--seed", "1"]);
    let (ok, _, err) = run_cli_env(&args, &[("HF_HUB_CACHE", tmp.path())]);
    assert!(ok, "{err}");
    assert!(out.is_file());
}

#[test]
fn bad_references() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = pipeline();
    let with_ref = |r| generate_args(&p, &out, &["--prompt", "x", "--ref", r]);
    // Too small (min side 64).
    let small = tmp.path().join("small.png");
    flux2::image_io::RgbImage { width: 40, height: 80, data: vec![128; 40 * 80 * 3] }.save_png(&small, &[]).unwrap();
    fails_cleanly(&with_ref(small.to_str().unwrap()), &["40x80", "at least 64"]);
    // Extreme aspect ratio.
    let thin = tmp.path().join("thin.png");
    flux2::image_io::RgbImage { width: 64, height: 600, data: vec![9; 64 * 600 * 3] }.save_png(&thin, &[]).unwrap();
    fails_cleanly(&with_ref(thin.to_str().unwrap()), &["aspect"]);
    // Unreadable and missing files.
    let junk = tmp.path().join("junk.png");
    std::fs::write(&junk, b"\x89PNG but not really").unwrap();
    fails_cleanly(&with_ref(junk.to_str().unwrap()), &["junk.png"]);
    fails_cleanly(&with_ref("/no/such.png"), &["/no/such.png"]);
}

#[test]
fn noise_must_fit_the_size() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = pipeline();
    let noise = fixtures().join("cases/t2i_nonsquare/noise.safetensors");
    let noise = noise.to_str().unwrap();
    fails_cleanly(
        &generate_args(&p, &out, &["--prompt", "x", "--width", "64", "--height", "64", "--noise", noise]),
        &["noise", "[1, 16, 4, 4]"],
    );
    // Without --width/--height the size follows the noise.
    let (ok, _, err) = run_cli(&generate_args(&p, &out, &["--prompt", "x", "--noise", noise]));
    assert!(ok, "{err}");
    let img = flux2::image_io::RgbImage::load(&out).unwrap();
    assert_eq!((img.width, img.height), (80, 48));
    fails_cleanly(
        &generate_args(&p, &out, &["--prompt", "x", "--noise", "/no/noise.safetensors"]),
        &["noise.safetensors"],
    );
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let prompt = "a very long prompt about many things ".repeat(120);
    let p = pipeline();
    let (ok, _, err) =
        run_cli(&generate_args(&p, &out, &["--prompt", &prompt, "--width", "16", "--height", "16", "--seed", "3"]));
    assert!(ok, "{err}");
    assert!(err.contains("tokens") && err.contains("512"), "expected a truncation warning: {err}");
}

#[test]
fn other_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline();
    let (jpg, png) = (tmp.path().join("o.jpg"), tmp.path().join("o.png"));
    fails_cleanly(&generate_args(&p, &jpg, &["--prompt", "x"]), &["PNG"]);
    fails_cleanly(&generate_args(&p, &png, &["--prompt", "x", "--count", "0"]), &["--count"]);
    fails_cleanly(
        &generate_args(&p, &png, &["--prompt", "x", "--steps", "0", "--width", "16", "--height", "16"]),
        &["steps"],
    );
    // It panicked with a capacity overflow in the sampler.
    fails_cleanly(
        &generate_args(
            &p,
            &png,
            &["--prompt", "x", "--steps", "18446744073709551615", "--width", "16", "--height", "16"],
        ),
        &["--steps must be between 1 and 1000"],
    );
    fails_cleanly(&generate_args(&p, &png, &["--prompt", "x", "--count", "1000000"]), &["--count"]);
    fails_cleanly(
        &["generate", "--model", &p, "--prompt", "x", "--out", png.to_str().unwrap(), "--device", "cuda"],
        &["cuda"],
    );
}
