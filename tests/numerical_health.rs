//! No silent black images: NaN or inf in a weight, the noise, the guidance or a computation
//! stops `generate` with a sentence that names the stage (and, with `--debug-nans`, the op and
//! component), a non-zero exit and no PNG; the JSON report says so.

mod common;

use std::path::{Path, PathBuf};

use common::{fails_cleanly, fixtures, generate_args, run_cli};
use flux2::weights::safetensors::SafetensorsFile;

/// A copy of the tiny fixture pipeline (symlinks, except the transformer file, which is copied).
fn pipeline_copy(dir: &Path) -> PathBuf {
    let src = fixtures().join("pipeline");
    let dst = dir.join("pipe");
    std::fs::create_dir_all(dst.join("transformer")).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "transformer" {
            std::os::unix::fs::symlink(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join("transformer").join(f), dst.join("transformer").join(f)).unwrap();
    }
    dst
}

/// Overwrite bf16 elements of a transformer weight: the first one, or all of them.
fn poison(pipe: &Path, key: &str, bits: u16, all: bool) {
    let path = pipe.join("transformer/diffusion_pytorch_model.safetensors");
    let info = SafetensorsFile::open(&path).unwrap().info(key).unwrap().clone();
    assert_eq!(info.dtype, "BF16");
    let mut bytes = std::fs::read(&path).unwrap();
    let end = if all { info.end } else { info.start + 2 };
    for at in (info.start..end).step_by(2) {
        bytes[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
}

const BF16_NAN: u16 = 0x7FC0;
const BF16_MAX: u16 = 0x7F7F;

fn small<'a>(flags: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--prompt", "a cat", "--width", "32", "--height", "32", "--seed", "5", "--steps", "3"];
    v.extend_from_slice(flags);
    v
}

#[test]
fn a_nan_weight_stops_the_run_and_names_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = pipeline_copy(tmp.path());
    poison(&pipe, "transformer_blocks.0.attn.to_out.0.weight", BF16_NAN, false);
    let (out, json) = (tmp.path().join("o.png"), tmp.path().join("r.json"));
    let p = pipe.to_str().unwrap();
    let args = generate_args(p, &out, &[]);
    let mut args: Vec<&str> = args.into_iter().chain(small(&["--json", json.to_str().unwrap()])).collect();
    fails_cleanly(&args, &["NaN or inf in the latents after denoising step 1 of 3", "--debug-nans"]);
    assert!(!out.exists(), "no image may be written");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["health"]["finite"], false, "{report}");
    assert!(report["health"]["error"].as_str().unwrap().contains("step 1 of 3"), "{report}");

    // --debug-nans names the weight as it loads.
    args.push("--debug-nans");
    fails_cleanly(&args, &["transformer_blocks.0.attn.to_out.0.weight", "the data itself holds NaN or inf"]);
    assert!(!out.exists());
}

#[test]
fn an_overflow_is_traced_to_the_op_and_block_that_made_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = pipeline_copy(tmp.path());
    // Finite but huge weights: the block's feed-forward overflows to inf.
    poison(&pipe, "single_transformer_blocks.1.attn.to_out.weight", BF16_MAX, true);
    let out = tmp.path().join("o.png");
    let p = pipe.to_str().unwrap();
    let args: Vec<&str> = generate_args(p, &out, &[]).into_iter().chain(small(&[])).collect();
    fails_cleanly(&args, &["NaN or inf in the latents after denoising step 1 of 3"]);
    let debug: Vec<&str> = args.iter().copied().chain(["--debug-nans"]).collect();
    fails_cleanly(&debug, &["transformer/single_blocks.1", "from finite inputs"]);
    assert!(!out.exists());
}

#[test]
fn a_healthy_run_reports_its_check() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, json) = (tmp.path().join("o.png"), tmp.path().join("r.json"));
    let p = fixtures().join("pipeline");
    let args: Vec<&str> = generate_args(p.to_str().unwrap(), &out, &[])
        .into_iter()
        .chain(small(&["--json", json.to_str().unwrap(), "--debug-nans"]))
        .collect();
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["health"]["finite"], true, "{report}");
    assert!(out.is_file());
}

#[test]
fn non_finite_guidance_and_noise_are_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let p = fixtures().join("pipeline");
    let p = p.to_str().unwrap();
    for g in ["--guidance=NaN", "--guidance=inf", "--guidance=-inf"] {
        fails_cleanly(&generate_args(p, &out, &small(&[g])), &["--guidance must be a finite number"]);
    }
    // A noise file with one NaN.
    let noise = tmp.path().join("noise.safetensors");
    let mut values = vec![0.5f32; 16 * 2 * 2];
    values[7] = f32::NAN;
    flux2::weights::safetensors::write_safetensors(
        &noise,
        vec![flux2::weights::safetensors::TensorEntry::from_f32("noise", &values, &[1, 16, 2, 2], flux2::DType::F32)],
        &Default::default(),
    )
    .unwrap();
    fails_cleanly(
        &generate_args(p, &out, &["--prompt", "x", "--noise", noise.to_str().unwrap()]),
        &["--noise tensor holds NaN at element 7"],
    );
    assert!(!out.exists());
}

#[test]
fn unwritable_outputs_are_found_before_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let p = fixtures().join("pipeline");
    let p = p.to_str().unwrap();
    let under_file = file.join("o.png");
    fails_cleanly(&generate_args(p, &under_file, &small(&[])), &["is not a folder"]);
    let out = tmp.path().join("o.png");
    let json = file.join("r.json");
    fails_cleanly(&generate_args(p, &out, &small(&["--json", json.to_str().unwrap()])), &["is not a folder"]);
    fails_cleanly(&generate_args(p, tmp.path(), &small(&[])), &["is a folder"]);
}
