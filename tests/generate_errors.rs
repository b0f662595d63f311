//! `flux2 generate` on bad input: a clear error and a non-zero exit, never a panic.

mod common;

use common::{fixtures, run_cli};

fn pipeline() -> String {
    fixtures().join("pipeline").to_str().unwrap().to_string()
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = run_cli(args);
    assert!(!ok, "expected failure: {args:?}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr of {args:?} lacks {n:?}: {err}");
    }
}

#[test]
fn sizes_must_be_multiples_of_16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = pipeline();
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--width",
            "100",
            "--height",
            "64",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["multiples of 16", "96x64"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--width",
            "0",
            "--height",
            "64",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["multiples of 16"],
    );
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
    fails_with(
        &[
            "generate",
            "--model",
            broken.to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["text_encoder"],
    );
    // A folder that is not a pipeline at all.
    fails_with(
        &[
            "generate",
            "--model",
            tmp.path().to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["model_index.json"],
    );
}

#[test]
fn repo_id_not_in_cache_says_how_to_download() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let (ok, _, err) = std::process::Command::new(common::bin())
        .args([
            "generate",
            "--model",
            "black-forest-labs/FLUX.2-klein-4B",
            "--prompt",
            "x",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .env("HF_HUB_CACHE", tmp.path())
        .output()
        .map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).to_string(),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        })
        .unwrap();
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
    let o = std::process::Command::new(common::bin())
        .args([
            "generate",
            "--model",
            "org/tiny",
            "--prompt",
            "x",
            "--width",
            "16",
            "--height",
            "16",
            "--seed",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .env("HF_HUB_CACHE", tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
}

#[test]
fn bad_references() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = pipeline();
    // Too small (min side 64).
    let small = tmp.path().join("small.png");
    flux2::image_io::RgbImage { width: 40, height: 80, data: vec![128; 40 * 80 * 3] }.save_png(&small, &[]).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--ref",
            small.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["40x80", "at least 64"],
    );
    // Extreme aspect ratio.
    let thin = tmp.path().join("thin.png");
    flux2::image_io::RgbImage { width: 64, height: 600, data: vec![9; 64 * 600 * 3] }.save_png(&thin, &[]).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--ref",
            thin.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["aspect"],
    );
    // Unreadable and missing files.
    let junk = tmp.path().join("junk.png");
    std::fs::write(&junk, b"\x89PNG but not really").unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--ref",
            junk.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["junk.png"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--ref",
            "/no/such.png",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["/no/such.png"],
    );
}

#[test]
fn noise_must_fit_the_size() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let noise = fixtures().join("cases/t2i_nonsquare/noise.safetensors");
    fails_with(
        &[
            "generate",
            "--model",
            &pipeline(),
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--noise",
            noise.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["noise", "[1, 16, 4, 4]"],
    );
    // Without --width/--height the size follows the noise.
    let (ok, _, err) = run_cli(&[
        "generate",
        "--model",
        &pipeline(),
        "--prompt",
        "x",
        "--noise",
        noise.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let img = flux2::image_io::RgbImage::load(&out).unwrap();
    assert_eq!((img.width, img.height), (80, 48));
    fails_with(
        &[
            "generate",
            "--model",
            &pipeline(),
            "--prompt",
            "x",
            "--noise",
            "/no/noise.safetensors",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["noise.safetensors"],
    );
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let prompt = "a very long prompt about many things ".repeat(120);
    let (ok, _, err) = run_cli(&[
        "generate",
        "--model",
        &pipeline(),
        "--prompt",
        &prompt,
        "--width",
        "16",
        "--height",
        "16",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("tokens") && err.contains("512"), "expected a truncation warning: {err}");
}

#[test]
fn other_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline();
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--out",
            tmp.path().join("o.jpg").to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["PNG"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--count",
            "0",
            "--out",
            tmp.path().join("o.png").to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["--count"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--steps",
            "0",
            "--width",
            "16",
            "--height",
            "16",
            "--out",
            tmp.path().join("o.png").to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &["steps"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            &p,
            "--prompt",
            "x",
            "--out",
            tmp.path().join("o.png").to_str().unwrap(),
            "--device",
            "cuda",
        ],
        &["cuda"],
    );
}
