//! Launcher for the non-finite check (kernels/health.cu) and the device's health word: one u32
//! in device memory that keeps the smallest check id whose tensor held NaN or ±inf.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;

use super::{gpu_err, grid_1d, launch, CudaBackend};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The word's value when nothing was recorded.
const NO_CHECK: u32 = u32::MAX;

/// The device's health word, allocated on first use.
#[derive(Default)]
pub struct HealthWord(Mutex<Option<CudaSlice<u8>>>);

impl CudaBackend {
    /// Device address of the health word, allocated and cleared on first use.
    fn health_word(&self) -> Result<u64> {
        let mut slot = self.dev.health.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(buf) = slot.as_ref() {
            return Ok(self.word_ptr(buf));
        }
        let buf = unsafe { self.dev.stream.alloc::<u8>(4) }.map_err(gpu_err)?;
        let p = self.word_ptr(&buf);
        self.clear_health_word(p)?;
        *slot = Some(buf);
        Ok(p)
    }

    fn word_ptr(&self, buf: &CudaSlice<u8>) -> u64 {
        cudarc::driver::DevicePtr::device_ptr(buf, &self.dev.stream).0
    }

    fn clear_health_word(&self, p: u64) -> Result<()> {
        launch!(self.dev, "fill_u32", grid_1d(1), p, NO_CHECK, 1i64)
    }
}

pub(super) fn record_nonfinite(be: &CudaBackend, x: &Tensor, check: u32) -> Result<()> {
    let x = be.dense(x)?;
    let kernel = match x.dtype().size_in_bytes() {
        2 => "nonfinite_check_b16",
        4 => "nonfinite_check_b32",
        _ => return Err(Error::shape("record_nonfinite", format!("{} tensors are not checked", x.dtype()))),
    };
    let word = be.health_word()?;
    let n = x.numel();
    launch!(be.dev, kernel, grid_1d(n), be.ptr(&x)?, n as i64, word, check)
}

pub(super) fn take_nonfinite(be: &CudaBackend) -> Result<Option<u32>> {
    let slot = be.dev.health.0.lock().unwrap_or_else(|e| e.into_inner());
    let Some(buf) = slot.as_ref() else {
        // Nothing was ever recorded; still wait for queued work, as the trait promises.
        return be.dev.stream.synchronize().map(|_| None).map_err(gpu_err);
    };
    let bytes: Vec<u8> = be.dev.stream.clone_dtoh(buf).map_err(gpu_err)?;
    let word = u32::from_le_bytes(bytes[..4].try_into().expect("a 4-byte word"));
    be.clear_health_word(be.word_ptr(buf))?;
    Ok((word != NO_CHECK).then_some(word))
}
