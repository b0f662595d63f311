//! CUDA graphs: work recorded once by stream capture and replayed with new input values. A
//! denoising step is a few hundred kernel launches, each a few µs of CPU; a replay is one.
//!
//! The recorded work reads its inputs from buffers made before the capture and leaves its result
//! in another; every allocation it makes in between is freed inside it, so the driver keeps that
//! memory for the graph's replays. Work that would allocate memory outliving the capture (a
//! workspace grown, a table uploaded) makes the capture fail: run it once eagerly first.

use std::sync::atomic::Ordering;

use cudarc::driver::{result, sys, CudaGraph};

use super::{default_pool, gemm_wgmma, gpu_err, CudaBackend};
use crate::backend::Captured;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A recording and the buffers it reads and writes.
struct Recording {
    /// Taken in `drop`, so the executable graph is gone before its memory is trimmed.
    graph: Option<CudaGraph>,
    be: CudaBackend,
    inputs: Vec<Tensor>,
    output: Tensor,
    /// Workspaces the recorded kernels use that the device may replace later (stream-K's).
    _workspaces: gemm_wgmma::StreamKBuffers,
}

/// Clears the device's capturing flag however the capture ends.
struct CapturingFlag<'a>(&'a CudaBackend);

impl Drop for CapturingFlag<'_> {
    fn drop(&mut self) {
        self.0.dev.capturing.store(false, Ordering::Relaxed);
    }
}

/// `FLUX2_CUDA_GRAPHS=off` runs every denoising step eagerly; unset or `on`: steps are recorded.
pub(super) fn graphs_from_env() -> Result<bool> {
    match std::env::var("FLUX2_CUDA_GRAPHS") {
        Err(_) => Ok(true),
        Ok(v) if v == "on" => Ok(true),
        Ok(v) if v == "off" => Ok(false),
        Ok(v) => Err(Error::InvalidArgument(format!("FLUX2_CUDA_GRAPHS={v:?}: expected on or off"))),
    }
}

/// Queue a copy of `src` (any view) into the dense tensor `dst` of the same shape and dtype.
fn copy_into(be: &CudaBackend, src: &Tensor, dst: &Tensor) -> Result<()> {
    if src.shape() != dst.shape() || src.dtype() != dst.dtype() {
        return Err(Error::shape(
            "graph input",
            format!("{:?} {} where the recording has {:?} {}", src.shape(), src.dtype(), dst.shape(), dst.dtype()),
        ));
    }
    let src = be.dense(src)?;
    let bytes = src.numel() * src.dtype().size_in_bytes();
    if bytes == 0 {
        return Ok(());
    }
    let stream = be.dev.stream.cu_stream();
    unsafe { result::memcpy_dtod_async(be.ptr(dst)?, be.ptr(&src)?, bytes, stream) }.map_err(gpu_err)
}

/// A dense copy of `x` in memory of its own.
fn fresh_copy(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    let out = be.output(x.dtype(), x.shape())?;
    copy_into(be, x, &out)?;
    Ok(out)
}

pub(super) fn capture(
    be: &CudaBackend,
    inputs: &[&Tensor],
    output: (&[usize], DType),
    work: &mut dyn FnMut(&[Tensor]) -> Result<Tensor>,
) -> Result<Option<Box<dyn Captured>>> {
    if !be.dev.graphs.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let bufs = inputs.iter().map(|x| fresh_copy(be, x)).collect::<Result<Vec<_>>>()?;
    let out = be.output(output.1, output.0)?;
    let dev = &be.dev;
    let graph = {
        let _flag = CapturingFlag(be);
        dev.captured_live.store(0, Ordering::Relaxed);
        dev.capturing.store(true, Ordering::Relaxed);
        // Thread-local: other threads' driver calls (telemetry) stay legal during the capture.
        dev.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(gpu_err)?;
        // The result is copied out and dropped inside the capture: its memory is the graph's.
        let recorded = work(&bufs).and_then(|y| copy_into(be, &y, &out));
        let graph = dev.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        graph.map_err(gpu_err)?.ok_or_else(|| Error::Gpu("the capture recorded nothing".into()))?
    };
    let escaped = dev.captured_live.load(Ordering::Relaxed);
    if escaped != 0 {
        // Launched once, the memory that outlives the capture exists until its tensors free it.
        graph.launch().map_err(gpu_err)?;
        dev.stream.synchronize().map_err(gpu_err)?;
        return Err(Error::Gpu(format!(
            "{escaped} bytes allocated while recording outlive the recording (a workspace grown or a table \
             uploaded inside it): run the work once before recording it"
        )));
    }
    graph.upload().map_err(gpu_err)?;
    dev.stream.synchronize().map_err(gpu_err)?;
    // The eager steps' memory kept in the default pool (`keep_pool_memory`): released for the
    // graph's own.
    if let Some(pool) = default_pool(&dev.ctx) {
        unsafe { sys::cuMemPoolTrimTo(pool, 0) };
    }
    let workspaces = dev.stream_k.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Some(Box::new(Recording {
        graph: Some(graph),
        be: be.clone(),
        inputs: bufs,
        output: out,
        _workspaces: workspaces,
    })))
}

impl Captured for Recording {
    fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::shape(
                "graph replay",
                format!("{} inputs for a recording of {}", inputs.len(), self.inputs.len()),
            ));
        }
        for (x, buf) in inputs.iter().zip(&self.inputs) {
            copy_into(&self.be, x, buf)?;
        }
        let graph = self.graph.as_ref().expect("present until dropped");
        graph.launch().map_err(gpu_err)?;
        // A tensor of its own: the next replay overwrites the output buffer.
        fresh_copy(&self.be, &self.output)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // Queued replays finish before the graph and its memory go.
        let _ = self.be.dev.stream.synchronize();
        drop(self.graph.take());
        unsafe { sys::cuDeviceGraphMemTrim(self.be.dev.ctx.cu_device()) };
    }
}
