//! The CPU backend: f32 compute, rayon for parallel loops. With `CpuPrecision::F32` (what
//! `CpuBackend::new` gives) every weight is widened to f32 and products go through the `gemm`
//! crate: the exact reference every GPU kernel and the bf16 path are checked against. With
//! `CpuPrecision::Bf16` weights stay in their stored dtype in the memory map and the linears run
//! the mixed-precision GEMM (`mixed_gemm`) on the best instruction set (`Isa`).

mod attention;
mod conv;
mod elementwise;
mod fast_math;
mod gemm;
mod layout;
pub mod mixed_gemm;
mod norm;
mod position;
pub mod precision;
pub mod quantized;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::backend::{check, AttnMask, Backend, Padding2d, QuantTensor};
use crate::dtype::{decode_to_f32, round_through, DType};
use crate::error::{Error, Result};
use crate::tensor::{CpuStorage, DeviceKind, Tensor};

pub use gemm::sgemm;
pub use precision::{CpuPrecision, Isa};

/// Clones share one health word (see `Backend::record_nonfinite`).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    nonfinite: Arc<AtomicU32>,
    precision: CpuPrecision,
    isa: Isa,
}

impl CpuBackend {
    /// The f32 reference.
    pub fn new() -> CpuBackend {
        CpuBackend::with_precision(CpuPrecision::F32, Isa::best())
    }

    /// `isa` chooses the mixed GEMM's path for bf16 precision (see `Isa::from_env`); an
    /// unavailable one falls back to the best available.
    pub fn with_precision(precision: CpuPrecision, isa: Isa) -> CpuBackend {
        let isa = if isa.available() { isa } else { Isa::best() };
        if precision == CpuPrecision::Bf16 {
            crate::host_memory::keep_freed_buffers();
        }
        CpuBackend { nonfinite: Arc::new(AtomicU32::new(NO_CHECK)), precision, isa }
    }

    pub fn precision(&self) -> CpuPrecision {
        self.precision
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

/// The health word's value when nothing was recorded.
const NO_CHECK: u32 = u32::MAX;

/// The elements of a CPU tensor as dense f32, borrowed when already dense f32.
pub(crate) fn dense<'a>(op: &'static str, x: &'a Tensor) -> Result<Cow<'a, [f32]>> {
    match x.cpu_storage() {
        Some(CpuStorage::F32(v)) if x.is_contiguous() => Ok(Cow::Borrowed(&v[x.offset()..x.offset() + x.numel()])),
        Some(_) => Ok(Cow::Owned(x.to_vec_f32()?)),
        None => Err(Error::shape(op, "the CPU backend was given a tensor that lives on another device")),
    }
}

/// A new buffer of `len` values made in parallel chunks of `chunk`: `fill(i, c)` writes chunk i.
/// Each task zeroes its own chunk just before `fill` (in cache, on its own core), where
/// `vec![0.0; len]` zeroes the whole buffer on the calling thread first (or, for fresh pages,
/// has the kernel fault them in on one core at a time).
pub(crate) fn par_filled(len: usize, chunk: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    y.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| {
        c.fill(std::mem::MaybeUninit::new(0.0));
        // SAFETY: every element of c was just initialised; MaybeUninit<f32> has f32's layout.
        fill(i, unsafe { &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) });
    });
    // SAFETY: the chunks cover all len values, each initialised above.
    unsafe { y.set_len(len) };
    y
}

pub(crate) fn output(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_f32(data, shape)
}

impl Backend for CpuBackend {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }

    fn name(&self) -> String {
        match self.precision {
            CpuPrecision::F32 => format!("cpu ({} threads, f32)", rayon::current_num_threads()),
            CpuPrecision::Bf16 => {
                format!("cpu ({} threads, bf16 weights, {} GEMM)", rayon::current_num_threads(), self.isa.name())
            }
        }
    }

    fn activation_dtype(&self) -> DType {
        DType::F32
    }

    fn upload(&self, host: &Tensor, dtype: DType) -> Result<Tensor> {
        if dtype == DType::F32 && matches!(host.cpu_storage(), Some(CpuStorage::F32(_))) {
            return Ok(host.clone());
        }
        let mut values = dense("upload", host)?.into_owned();
        round_through(&mut values, dtype);
        output(values, host.shape())
    }

    fn load_weight(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if bytes.len() != numel * dtype.size_in_bytes() {
            return Err(Error::shape(
                "load_weight",
                format!("{} bytes of {dtype} cannot have shape {shape:?}", bytes.len()),
            ));
        }
        if self.precision == CpuPrecision::Bf16 && matches!(dtype, DType::BF16 | DType::F16 | DType::F8E4M3) {
            // Keep the weight as stored: in the memory map when it comes from one, else as a copy
            // of its bytes; the kernels convert it while packing.
            let storage = match crate::weights::mapping::find(bytes) {
                Some(mapped) => CpuStorage::Mapped(mapped, dtype),
                None => match dtype {
                    DType::BF16 => CpuStorage::BF16(
                        bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect(),
                    ),
                    DType::F16 => {
                        CpuStorage::F16(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect())
                    }
                    _ => CpuStorage::F8E4M3(bytes.to_vec()),
                },
            };
            return Tensor::from_storage(crate::tensor::Storage::Cpu(storage), shape);
        }
        output(decode_to_f32(bytes, dtype), shape)
    }

    fn contiguous(&self, x: &Tensor) -> Result<Tensor> {
        if x.is_contiguous() && matches!(x.cpu_storage(), Some(CpuStorage::F32(_))) {
            return Ok(x.clone());
        }
        output(dense("contiguous", x)?.into_owned(), x.shape())
    }

    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        layout::concat(xs, dim)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if self.precision == CpuPrecision::Bf16 && mixed_gemm::Weights::of(w).is_some() {
            return mixed_gemm::linear(self.isa, x, w, bias);
        }
        gemm::linear(x, w, bias)
    }

    fn decoded_weight_dtype(&self) -> DType {
        // bf16 precision keeps weights in bf16, decoded ones too (half the memory of f32).
        match self.precision {
            CpuPrecision::F32 => DType::F32,
            CpuPrecision::Bf16 => DType::BF16,
        }
    }

    fn keeps_fp8_codes(&self) -> bool {
        self.precision == CpuPrecision::Bf16
    }

    fn load_quantized(&self, q: &crate::quant::Quantized) -> Result<QuantTensor> {
        q.validate()?;
        if self.precision == CpuPrecision::Bf16 {
            // Codes and scales kept as they are: the mixed GEMM dequantizes them in its packing.
            let data =
                Tensor::from_storage(crate::tensor::Storage::Cpu(CpuStorage::U8(q.codes.clone())), &[q.codes.len()])?;
            let scales = (!q.scales.is_empty()).then(|| output(q.scales.clone(), &[q.scales.len()])).transpose()?;
            return Ok(QuantTensor { format: q.format, rows: q.rows, cols: q.cols, data, scales });
        }
        // The f32 reference: the dequantized values.
        let data = output(crate::quant::dequantize(q), &[q.rows, q.cols])?;
        Ok(QuantTensor { format: q.format, rows: q.rows, cols: q.cols, data, scales: None })
    }

    fn linear_quantized(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
        check::linear_quantized("linear_quantized", x, w, bias)?;
        match mixed_gemm::Weights::of_quantized(w) {
            Some(codes) => mixed_gemm::linear_quantized(self.isa, x, codes, bias),
            None => gemm::linear(x, &w.data, bias),
        }
    }

    fn linear_fp8(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
        check::linear_fp8(x, w, bias)?;
        match mixed_gemm::Weights::of_quantized(w) {
            Some(codes) => {
                // Activations rounded per token to fp8 as the GPU's W8A8 GEMM sees them; the
                // weight's codes dequantized in the packing.
                let xq = quantized::quantize_rows_fp8(&dense("linear_fp8", x)?, x.last_dim());
                mixed_gemm::linear_quantized(self.isa, &Tensor::from_f32(xq, x.shape())?, codes, bias)
            }
            None => quantized::linear_fp8(x, &w.data, bias),
        }
    }

    fn attention_sage(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
        quantized::attention_sage(q, k, v, mask, scale)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
        // Only where bf16 products are faster than the f32 GEMM (v3, v4).
        if self.precision == CpuPrecision::Bf16 && matches!(self.isa, Isa::Avx512Bf16 | Isa::Amx) {
            return attention::attention_mixed(self.isa, q, k, v, mask, scale);
        }
        attention::attention(q, k, v, mask, scale)
    }

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: Padding2d,
    ) -> Result<Tensor> {
        if self.precision == CpuPrecision::Bf16 {
            if let Some(y) = conv::conv2d_mixed(self.isa, x, w, bias, stride, padding)? {
                return Ok(y);
            }
        }
        conv::conv2d(x, w, bias, stride, padding)
    }

    fn layer_norm(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        norm::layer_norm(x, eps)
    }

    fn modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        elementwise::modulate(x, shift, scale)
    }

    fn rms_norm(&self, x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        norm::rms_norm(x, weight, eps)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        weight: &Tensor,
        bias: &Tensor,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor> {
        norm::group_norm(x, groups, weight, bias, eps, silu, self.precision == CpuPrecision::Bf16)
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::silu(x, self.precision == CpuPrecision::Bf16)
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::swiglu(x, self.precision == CpuPrecision::Bf16)
    }

    fn swiglu_concat(&self, prefix: &Tensor, x: &Tensor) -> Result<Tensor> {
        match elementwise::swiglu_concat(prefix, x, self.precision == CpuPrecision::Bf16)? {
            Some(joined) => Ok(joined),
            None => self.concat(&[prefix, &self.swiglu(x)?], prefix.rank().saturating_sub(1)),
        }
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        check::same_shape("axpby", x, y)?;
        let (xv, yv) = (dense("axpby", x)?, dense("axpby", y)?);
        output(xv.iter().zip(yv.iter()).map(|(x, y)| a * x + b * y).collect(), x.shape())
    }

    fn gated_add(&self, x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
        elementwise::gated_add(x, gate, y)
    }

    fn channel_affine(&self, x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<Tensor> {
        elementwise::channel_affine(x, mul, add)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        elementwise::upsample_nearest2x(x)
    }

    fn rope_interleaved(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        position::rope(x, cos, sin, position::RopeLayout::Interleaved)
    }

    fn rope_half(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        position::rope(x, cos, sin, position::RopeLayout::Half)
    }

    fn timestep_embedding(&self, t: &Tensor, dim: usize, max_period: f32) -> Result<Tensor> {
        check::timestep_embedding(t, dim)?;
        position::timestep_embedding(&t.to_vec_f32()?, dim, max_period)
    }

    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        position::embedding(ids, table)
    }

    fn record_nonfinite(&self, x: &Tensor, check: u32) -> Result<()> {
        if dense("record_nonfinite", x)?.iter().any(|v| !v.is_finite()) {
            self.nonfinite.fetch_min(check, Ordering::Relaxed);
        }
        Ok(())
    }

    fn take_nonfinite(&self) -> Result<Option<u32>> {
        let word = self.nonfinite.swap(NO_CHECK, Ordering::Relaxed);
        Ok((word != NO_CHECK).then_some(word))
    }
}
