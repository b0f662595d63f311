//! `flux2 doctor`: what this binary and machine can do: driver, GPU, VRAM, compute capability,
//! embedded kernel images, NVML.

use crate::error::Result;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {}

pub fn run(_args: &DoctorArgs) -> Result<()> {
    println!("flux2 {}", env!("CARGO_PKG_VERSION"));
    println!("cpu backend: {}", crate::backend::Backend::name(&crate::backend::cpu::CpuBackend::new()));
    #[cfg(feature = "cuda")]
    cuda_report();
    #[cfg(not(feature = "cuda"))]
    println!("cuda backend: not built (cargo feature `cuda` is off)");
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_report() {
    use crate::backend::cuda::{images, CudaBackend};
    let targets = images::embedded_targets();
    if targets.is_empty() {
        println!("kernel images: none ({})", images::KERNEL_STATUS);
    } else {
        println!("kernel images: {} (modules: {})", targets.join(", "), images::embedded_modules().join(", "));
    }
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("driver: libcuda.so not found (no NVIDIA driver): GPU unavailable, --device auto uses the CPU");
    } else {
        let mut version = 0i32;
        let ok = unsafe {
            cudarc::driver::sys::cuInit(0) == cudarc::driver::sys::CUresult::CUDA_SUCCESS
                && cudarc::driver::sys::cuDriverGetVersion(&mut version) == cudarc::driver::sys::CUresult::CUDA_SUCCESS
        };
        if ok {
            println!("driver: CUDA {}.{}", version / 1000, (version % 1000) / 10);
        }
        match CudaBackend::new(0) {
            Ok(be) => {
                let d = be.device();
                let (free, total) = d.ctx.mem_get_info().unwrap_or((0, d.total_memory));
                println!("gpu 0: {}", d.name);
                println!(
                    "  compute capability: {}.{} (kernel image {})",
                    d.compute_capability.0, d.compute_capability.1, d.target
                );
                println!(
                    "  memory: {:.1} GiB free of {:.1} GiB",
                    free as f64 / 1073741824.0,
                    total as f64 / 1073741824.0
                );
                println!("  kernels: {}", be.kernel_summary());
            }
            Err(e) => println!("gpu: not usable: {e}"),
        }
    }
    match crate::telemetry::Telemetry::new() {
        Some(t) => println!("nvml: {}", t.describe()),
        None => println!("nvml: not available (libnvidia-ml.so.1 missing): no utilisation/clock telemetry"),
    }
}
