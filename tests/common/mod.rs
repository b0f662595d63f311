//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use flux2::weights::WeightStore;
use flux2::Tensor;

/// The committed fixtures; FLUX2_FIXTURES overrides the build-time path (test binaries carried to
/// a GPU machine run from another checkout).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("FLUX2_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub fn t(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(data.to_vec(), shape).unwrap()
}

/// A tensor from a safetensors file (any numeric dtype) as f32.
pub fn load(path: &Path, name: &str) -> Tensor {
    let store = WeightStore::open(path).unwrap();
    flux2::cli::read_f32(&store, name).unwrap()
}

/// max |a - b| / max |b|: the relative error used by every parity gate.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    if a.iter().any(|x| x.is_nan()) {
        return f32::INFINITY;
    }
    diff / scale
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "element {i}: got {g}, want {w}\n got {got:?}\nwant {want:?}");
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flux2")
}

/// Run the CLI, returning (success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    // Keep the prompt cache of test runs out of the user's home.
    let cache = std::env::temp_dir().join("flux2-test-cache");
    let out = std::process::Command::new(bin()).args(args).env("FLUX2_CACHE_DIR", cache).output().expect("run flux2");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Cosine similarity and ‖a − b‖ / ‖b‖.
pub fn cosine_and_rel_l2(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (cos, rel, _) = flux2::cli::compare::similarity(a, b);
    (cos, rel)
}

/// The base (undistilled) pipeline: the fixture folder's components (linked) with a
/// model_index.json without `is_distilled`.
pub fn base_pipeline(dir: &Path) -> PathBuf {
    let src = fixtures().join("pipeline");
    std::fs::create_dir_all(dir).unwrap();
    for c in ["tokenizer", "text_encoder", "transformer", "vae", "scheduler"] {
        std::os::unix::fs::symlink(src.join(c), dir.join(c)).unwrap();
    }
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap()).unwrap();
    index.as_object_mut().unwrap().remove("is_distilled");
    std::fs::write(dir.join("model_index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}
