//! The CPU backend's bf16 precision on whole pipelines: the fixture pipeline's weights are stored
//! in bf16 (VAE f16), so bf16 precision keeps them in the memory map and runs the mixed GEMM. Held
//! to the GPU's tolerance against the float32 diffusers images (mean error ≤ 2/255), on every
//! GEMM path this CPU has.

mod common;

use std::sync::Arc;

use flux2::backend::cpu::{CpuBackend, CpuPrecision, Isa};
use flux2::Backend;

#[test]
fn bf16_precision_pipelines_are_within_the_gpu_tolerance() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path().join("base");
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        let be: Arc<dyn Backend> = Arc::new(CpuBackend::with_precision(CpuPrecision::Bf16, isa));
        for case in common::pipeline_cases() {
            let mad = common::pipeline_case_error(&be, &case, &base);
            eprintln!("{} {}: mean absolute pixel error {mad:.3}/255", isa.name(), case.name);
            assert!(mad <= 2.0, "{} {}: {mad}", isa.name(), case.name);
        }
    }
}
