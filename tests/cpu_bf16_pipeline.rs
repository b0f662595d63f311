//! The CPU backend's bf16 precision on whole pipelines: the fixture pipeline's weights are stored
//! in bf16 (VAE f16), so bf16 precision keeps them in the memory map and runs the mixed GEMM. Held
//! to the GPU's tolerance against the float32 diffusers images (mean error ≤ 2/255), on every
//! GEMM path this CPU has.

mod common;

use std::sync::Arc;

use common::fixtures;
use flux2::backend::cpu::{CpuBackend, CpuPrecision, Isa};
use flux2::image_io::RgbImage;
use flux2::pipeline::Pipeline;
use flux2::Backend;

#[test]
fn bf16_precision_pipelines_are_within_the_gpu_tolerance() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path().join("base");
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::with_precision(CpuPrecision::Bf16, isa));
        for case in common::pipeline_cases() {
            let root = if case.base {
                if !base.exists() {
                    common::base_pipeline(&base);
                }
                base.clone()
            } else {
                fixtures().join("pipeline")
            };
            let pipe = Pipeline::load(be.clone(), &root).unwrap();
            let prepared = pipe.prepare_references(&case.references).unwrap();
            let request = flux2::pipeline::Request {
                timestep_mode: Some(flux2::sampler::TimestepMode::DiffusersF32),
                ..case.request.clone()
            };
            let out = pipe.generate(&request, None, prepared.as_ref()).unwrap();
            let mad = common::mean_pixel_error(&out.image, &RgbImage::load(&case.dir.join("expected.png")).unwrap());
            eprintln!("{} {}: mean absolute pixel error {mad:.3}/255", isa.name(), case.name);
            assert!(mad <= 2.0, "{} {}: {mad}", isa.name(), case.name);
        }
    }
}
