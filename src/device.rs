//! Backend selection for the CLI: `cpu`, `cuda` or `auto` (CUDA when usable, else the CPU with
//! a notice).

use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

pub fn select(choice: DeviceChoice) -> Result<Arc<dyn Backend>> {
    match choice {
        DeviceChoice::Cpu => Ok(Arc::new(CpuBackend::new())),
        DeviceChoice::Cuda => cuda().map_err(|e| match e {
            Error::Gpu(m) | Error::Unsupported(m) => Error::Gpu(format!("--device cuda is not usable: {m}")),
            other => other,
        }),
        DeviceChoice::Auto => match cuda() {
            Ok(be) => Ok(be),
            Err(e) => {
                tracing::info!("no usable GPU ({e}); running on the CPU reference backend");
                Ok(Arc::new(CpuBackend::new()))
            }
        },
    }
}

/// Every device a server should run a worker on: all visible GPUs for `cuda` (and for `auto`
/// when there is one; CUDA_VISIBLE_DEVICES chooses), else one CPU backend.
pub fn select_all(choice: DeviceChoice) -> Result<Vec<Arc<dyn Backend>>> {
    let first = select(choice)?;
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
