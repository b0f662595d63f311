//! Split-file setups: `--transformer F --text-encoder F --vae F` without a diffusers folder (as
//! ComfyUI and stable-diffusion.cpp users keep their files), configs read off the shapes and the
//! tokenizer built into the binary.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use flux2::image_io::RgbImage;
use flux2::model::tokenizer::{PromptTokenizer, MAX_TOKENS};

/// The pipeline fixture's three components copied under the names ComfyUI users have, with no
/// config.json or tokenizer anywhere near them. (The tiny VAE uses 4 norm groups, which no file
/// states; runs that need it take the VAE folder, see `a_loose_vae_file_reads_its_config`.)
fn loose_files(dir: &Path) -> [PathBuf; 3] {
    let p = fixtures().join("pipeline");
    let files = [
        (p.join("transformer/diffusion_pytorch_model.safetensors"), dir.join("flux-2-klein-tiny.safetensors")),
        (p.join("text_encoder/model.safetensors"), dir.join("qwen_3_tiny.safetensors")),
        (p.join("vae/diffusion_pytorch_model.safetensors"), dir.join("flux2-vae.safetensors")),
    ];
    for (from, to) in &files {
        std::fs::copy(from, to).unwrap();
    }
    files.map(|(_, to)| to)
}

fn case_flags(case: &Path) -> Vec<String> {
    let noise = case.join("noise.safetensors");
    ["--prompt", "a lighthouse on a cliff at dusk", "--width", "80", "--height", "48", "--noise"]
        .iter()
        .map(|s| s.to_string())
        .chain([noise.to_str().unwrap().to_string(), "--device".into(), "cpu".into()])
        .collect()
}

#[test]
fn separate_files_make_the_folders_image() {
    let case = fixtures().join("cases/t2i_nonsquare");
    let tmp = tempfile::tempdir().unwrap();
    let [t, te, _] = loose_files(tmp.path());
    let v = fixtures().join("pipeline/vae");
    let out = tmp.path().join("split.png");
    let mut args: Vec<String> =
        ["generate", "--transformer", t.to_str().unwrap(), "--text-encoder", te.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(["--vae".into(), v.to_str().unwrap().into(), "--out".into(), out.to_str().unwrap().into()]);
    args.extend(case_flags(&case));
    let (ok, _, err) = run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(err.contains("taken as a distilled model"), "the guessed variant is not reported: {err}");
    let got = RgbImage::load(&out).unwrap();
    let want = RgbImage::load(&case.join("expected.png")).unwrap();
    assert!(mean_pixel_error(&got, &want) <= 0.5, "mean error {}", mean_pixel_error(&got, &want));
}

#[test]
fn a_loose_vae_file_reads_its_config() {
    use flux2::model::vae::{open, VaeConfig};
    let tmp = tempfile::tempdir().unwrap();
    let [_, _, v] = loose_files(tmp.path());
    let folder = VaeConfig::from_json_file(&fixtures().join("pipeline/vae/config.json")).unwrap();
    // Everything but the norm groups comes from the shapes; with FLUX.2's 32 groups the tiny
    // VAE's 8 channels are refused with a message that says what to do.
    let err = open(&v).unwrap_err().to_string();
    assert!(err.contains("norm groups") && err.contains("config.json"), "{err}");
    let store = flux2::weights::WeightStore::open(&v).unwrap();
    assert_eq!(VaeConfig::infer_from_diffusers(&store, 4).unwrap(), folder);
}

#[test]
fn a_component_file_replaces_the_folders_own() {
    let case = fixtures().join("cases/t2i_nonsquare");
    let tmp = tempfile::tempdir().unwrap();
    let [t, _, _] = loose_files(tmp.path());
    let out = tmp.path().join("mixed.png");
    let pipe = fixtures().join("pipeline");
    let mut args: Vec<String> = [
        "generate",
        "--model",
        pipe.to_str().unwrap(),
        "--transformer",
        t.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(case_flags(&case));
    let (ok, _, err) = run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let got = RgbImage::load(&out).unwrap();
    assert!(mean_pixel_error(&got, &RgbImage::load(&case.join("expected.png")).unwrap()) <= 0.5);
}

#[test]
fn missing_components_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let [t, te, _] = loose_files(tmp.path());
    let out = tmp.path().join("x.png");
    let (t, te, out) = (t.to_str().unwrap(), te.to_str().unwrap(), out.to_str().unwrap());
    fails_cleanly(
        &["generate", "--transformer", t, "--text-encoder", te, "--prompt", "p", "--out", out, "--device", "cpu"],
        &["--model", "--vae"],
    );
    fails_cleanly(
        &[
            "generate",
            "--transformer",
            t,
            "--text-encoder",
            te,
            "--vae",
            "/no/such/vae.safetensors",
            "--prompt",
            "p",
            "--out",
            out,
        ],
        &["--vae", "/no/such/vae.safetensors"],
    );
    // A file of the wrong component is named as such, not a panic.
    fails_cleanly(
        &["generate", "--transformer", te, "--text-encoder", te, "--vae", te, "--prompt", "p", "--out", out],
        &["not a FLUX.2"],
    );
}

#[test]
fn the_built_in_tokenizer_matches_the_tokenizer_folder() {
    let folder = PromptTokenizer::load(&fixtures().join("pipeline/tokenizer")).unwrap();
    let builtin = PromptTokenizer::builtin().unwrap();
    assert_eq!(builtin.vocab_size(), folder.vocab_size());
    assert_eq!(builtin.pad_id(), folder.pad_id());
    for prompt in [
        "a lighthouse on a cliff at dusk",
        "Ünïcödé — 東京の夜景, emoji 🚀 and <|im_end|> written literally",
        "  leading spaces\n\nnew lines\ttabs 12345 don't",
    ] {
        assert_eq!(
            builtin.encode_prompt(prompt, MAX_TOKENS).unwrap(),
            folder.encode_prompt(prompt, MAX_TOKENS).unwrap()
        );
    }
}
