//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod workflows;

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

/// Position ids `[.., axes]` from a safetensors file.
pub fn position_ids(path: &Path, name: &str) -> flux2::model::rope::PositionIds {
    let t = load(path, name);
    flux2::model::rope::PositionIds::new(t.dim(t.rank() - 1), t.to_vec_f32().unwrap()).unwrap()
}

/// The transformer on a committed case's inputs, as the fixture script ran it: inputs in the
/// backend's activation dtype, timestep and guidance (when present) ×1000 in that dtype, position
/// ids from `ids_file` in the case folder.
pub fn forward_case(model: &flux2::model::transformer::Flux2Transformer, case_dir: &Path, ids_file: &str) -> Vec<f32> {
    let be = model.backend();
    let act = be.activation_dtype();
    let inputs = case_dir.join("inputs.safetensors");
    let up = |n: &str| be.upload(&load(&inputs, n), act).unwrap();
    // The fixtures' reference computed `timestep · 1000` in float32; so does every backend here
    // (a bf16 time would move the sinusoid's phase, not measure the kernels).
    let scaled = |n: &str| {
        flux2::model::transformer::scale_in_dtype(&load(&inputs, n).to_vec_f32().unwrap(), 1000.0, flux2::DType::F32)
    };
    let ids = |n: &str| position_ids(&case_dir.join(ids_file), n);
    let guidance = WeightStore::open(&inputs).unwrap().contains("guidance").then(|| scaled("guidance"));
    model
        .forward(
            &up("hidden_states"),
            &up("encoder_hidden_states"),
            &scaled("timestep"),
            &ids("img_ids"),
            &ids("txt_ids"),
            guidance.as_deref(),
        )
        .unwrap()
        .to_vec_f32()
        .unwrap()
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
    run_cli_env(args, &[])
}

/// Run the CLI with extra environment variables (they override the test prompt cache folder).
pub fn run_cli_env(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    // Keep the prompt cache of test runs out of the user's home.
    let cache = std::env::temp_dir().join("flux2-test-cache");
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args).env("FLUX2_CACHE_DIR", cache);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run flux2");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The CLI must fail with an `error:` line naming every needle, and must not panic.
pub fn fails_cleanly(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = run_cli(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(err.contains("error:"), "stderr for {args:?} has no error line: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks {n:?}: {err}");
    }
}

/// `flux2 generate --model <model> <flags..> --out <out> --device cpu`.
pub fn generate_args<'a>(model: &'a str, out: &'a Path, flags: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["generate", "--model", model];
    args.extend_from_slice(flags);
    // The fixtures' references are float32 diffusers runs: the exact f32 CPU path reproduces them.
    args.extend(["--out", out.to_str().unwrap(), "--device", "cpu", "--cpu-precision", "f32"]);
    args
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

/// One committed pipeline case (tests/fixtures/cases/<name>): its folder, the pipeline it runs on,
/// the request (with the fixed noise) and the reference images.
pub struct PipelineCase {
    pub name: String,
    pub dir: PathBuf,
    pub base: bool,
    pub request: flux2::pipeline::Request,
    pub references: Vec<flux2::image_io::RgbImage>,
}

/// One pipeline case on `be` as the reference ran it (float32 timesteps, as the expected images
/// come from float32 diffusers): the mean absolute pixel error against its expected image.
/// `base` is a scratch folder where the base (CFG) pipeline is made when a case needs it.
pub fn pipeline_case_error(be: &std::sync::Arc<dyn flux2::Backend>, case: &PipelineCase, base: &Path) -> f64 {
    let root = if case.base {
        if !base.exists() {
            base_pipeline(base);
        }
        base.to_path_buf()
    } else {
        fixtures().join("pipeline")
    };
    let pipe = flux2::pipeline::Pipeline::load(be.clone(), &root).unwrap();
    let prepared = pipe.prepare_references(&case.references).unwrap();
    let request = flux2::pipeline::Request {
        timestep_mode: Some(flux2::sampler::TimestepMode::DiffusersF32),
        ..case.request.clone()
    };
    let out = pipe.generate(&request, None, prepared.as_ref()).unwrap();
    mean_pixel_error(&out.image, &flux2::image_io::RgbImage::load(&case.dir.join("expected.png")).unwrap())
}

pub fn pipeline_cases() -> Vec<PipelineCase> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(fixtures().join("cases")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs.into_iter()
        .map(|dir| {
            let j: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
            let references: Vec<flux2::image_io::RgbImage> = j["refs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| flux2::image_io::RgbImage::load(&dir.join(r.as_str().unwrap())).unwrap())
                .collect();
            let request = flux2::pipeline::Request {
                prompt: j["prompt"].as_str().unwrap().into(),
                width: references.is_empty().then(|| j["width"].as_u64().unwrap() as usize),
                height: references.is_empty().then(|| j["height"].as_u64().unwrap() as usize),
                steps: Some(j["steps"].as_u64().unwrap() as usize),
                guidance: Some(j["guidance"].as_f64().unwrap() as f32),
                noise: Some(load(&dir.join("noise.safetensors"), "noise")),
                ..Default::default()
            };
            PipelineCase {
                name: dir.file_name().unwrap().to_string_lossy().into(),
                base: j["pipeline"] == "base",
                dir,
                request,
                references,
            }
        })
        .collect()
}

/// Mean absolute difference of two images in 1/255 units.
pub fn mean_pixel_error(a: &flux2::image_io::RgbImage, b: &flux2::image_io::RgbImage) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.data.iter().zip(&b.data).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.data.len() as f64
}

/// Every checkpoint format fixture (GGUF Q8_0/Q4_K, ComfyUI fp8/nvfp4/int8) through the transformer on
/// `be` in bf16, against the f32 references at the GPU's bf16 gates; the fp8 one also with FP8
/// compute.
#[allow(dead_code)]
pub fn checkpoint_formats_in_bf16(be: std::sync::Arc<dyn flux2::Backend>) {
    use flux2::model::transformer::Compute;
    use flux2::planner::TransformerPrecision;
    let formats = fixtures().join("formats");
    for (case, file, key) in [
        ("gguf_q8_0", "transformer.gguf", "sample_exact"),
        ("gguf_q4_k", "transformer.gguf", "sample_exact"),
        ("fp8", "flux-2-klein-tiny-fp8.safetensors", "sample"),
        ("nvfp4", "flux-2-klein-tiny-nvfp4.safetensors", "sample"),
        ("int8", "flux-2-klein-tiny-int8.safetensors", "sample"),
    ] {
        let dir = formats.join(case);
        let want = load(&dir.join("expected.safetensors"), key).to_vec_f32().unwrap();
        let mut computes = vec![("bf16", Compute::default(), 0.999)];
        if case == "fp8" {
            let fp8 = Compute { precision: Some(TransformerPrecision::Fp8), ..Compute::default() };
            computes.push(("fp8", fp8, 0.99));
        }
        for (label, compute, min_cos) in computes {
            let model =
                flux2::model::transformer::Flux2Transformer::load_with(be.clone(), &dir.join(file), None, compute)
                    .unwrap();
            let out = forward_case(&model, &dir, "ids_int64.safetensors");
            let (cos, rel) = cosine_and_rel_l2(&out, &want);
            println!("format {case} ({label} compute): cosine {cos:.6}, rel_l2 {rel:.2e}");
            assert!(cos >= min_cos && rel <= 0.1, "{case} {label}: cosine {cos}, rel_l2 {rel}");
        }
    }
}
