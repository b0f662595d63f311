//! Backend selection for the CLI: `cpu`, `cuda` or `auto` (CUDA when usable, else the CPU with
//! a notice).

use std::sync::Arc;

use crate::backend::cpu::{CpuBackend, CpuPrecision, Isa};
use crate::backend::Backend;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

pub fn select(choice: DeviceChoice) -> Result<Arc<dyn Backend>> {
    select_with(choice, CpuPrecision::F32)
}

/// The CPU backend in `precision`, its GEMM path from `FLUX2_CPU_ISA` or the CPU's features.
fn cpu(precision: CpuPrecision) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(CpuBackend::with_precision(precision, Isa::from_env()?)))
}

/// `select`, with the CPU backend (when chosen or fallen back to) computing in `cpu_precision`.
pub fn select_with(choice: DeviceChoice, cpu_precision: CpuPrecision) -> Result<Arc<dyn Backend>> {
    match choice {
        DeviceChoice::Cpu => cpu(cpu_precision),
        DeviceChoice::Cuda => cuda().map_err(|e| match e {
            Error::Gpu(m) | Error::Unsupported(m) => Error::Gpu(format!("--device cuda is not usable: {m}")),
            other => other,
        }),
        DeviceChoice::Auto => match cuda() {
            Ok(be) => Ok(be),
            Err(e) => {
                tracing::info!("no usable GPU ({e}); running on the CPU backend");
                cpu(cpu_precision)
            }
        },
    }
}

/// Every device a server should run a worker on: all visible GPUs for `cuda` (and for `auto`
/// when there is one; CUDA_VISIBLE_DEVICES chooses), else one CPU backend.
pub fn select_all(choice: DeviceChoice, cpu_precision: CpuPrecision) -> Result<Vec<Arc<dyn Backend>>> {
    let first = select_with(choice, cpu_precision)?;
    #[cfg(feature = "cuda")]
    if as_cuda(&first).is_some() {
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| Error::Gpu(e.to_string()))?.max(1);
        let mut all = vec![first];
        for ordinal in 1..count as usize {
            all.push(Arc::new(crate::backend::cuda::CudaBackend::new(ordinal)?));
        }
        return Ok(all);
    }
    Ok(vec![first])
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(crate::backend::cuda::CudaBackend::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Arc<dyn Backend>> {
    Err(Error::Unsupported("this binary was built without the CUDA backend (cargo feature `cuda`)".into()))
}

/// The CUDA backend behind a selected backend, if it is one.
#[cfg(feature = "cuda")]
pub fn as_cuda(be: &Arc<dyn Backend>) -> Option<&crate::backend::cuda::CudaBackend> {
    be.as_any().downcast_ref()
}

/// Free memory of the device `be` runs on, as its driver reports it (None on the CPU).
pub fn free_memory(be: &Arc<dyn Backend>) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Some(c) = as_cuda(be) {
        return c.free_memory();
    }
    let _ = be;
    None
}

/// (live, peak) bytes of the engine's device tensors, where the backend tracks them.
pub fn memory(be: &Arc<dyn Backend>) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Some(c) = as_cuda(be) {
        return Some(c.memory());
    }
    let _ = be;
    None
}

/// The memory budget for a run: `explicit` (--vram-budget), else on a GPU its free VRAM and on
/// the CPU the host's available memory, less 5% and 256 MiB of headroom; with the plan target
/// that gives the sizes the backend really stores.
pub fn plan_budget(
    be: &Arc<dyn Backend>,
    explicit: Option<&str>,
    cpu_precision: CpuPrecision,
) -> Result<Option<(usize, crate::planner::Target)>> {
    let cpu = be.kind() == crate::tensor::DeviceKind::Cpu;
    let target = if cpu { crate::planner::Target::Cpu(cpu_precision) } else { crate::planner::Target::Gpu };
    let headroom = |free: usize| ((free as f64 * 0.95) as usize).saturating_sub(256 << 20);
    Ok(match explicit {
        Some(b) => Some((crate::planner::parse_bytes(b)?, target)),
        None if cpu => crate::host_memory::available().map(|a| (headroom(a), target)),
        None => free_memory(be).map(|free| (headroom(free), target)),
    })
}
