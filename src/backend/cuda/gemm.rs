//! Launchers for the matrix kernels (kernels/gemm.cu): `linear`, and the GEMM under conv2d v1.

use cudarc::driver::LaunchConfig;

use super::gemm_wgmma::GatedArgs;
use super::{launch, CudaBackend};
use crate::backend::{check, QuantTensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The DiT's gated residual a GEMM's epilogue adds, out = x + gate · y (`linear_gated_add`'s
/// contract): x `[B, L, N]` shaped like the linear's output, gate `[B, N]`. The bf16 and FP8 gated
/// linears share it.
#[derive(Clone, Copy)]
pub(super) struct Residual<'a> {
    pub x: &'a Tensor,
    pub gate: &'a Tensor,
}

/// A residual's operands as the gated kernels take them, with the dense copies their addresses
/// point into (kept alive until the launch).
pub(super) struct GatedOperands {
    pub args: GatedArgs,
    _keep: [Tensor; 2],
}

impl Residual<'_> {
    /// x against the linear's output shape `out`, the gate against x.
    pub(super) fn check(&self, op: &'static str, out: &[usize]) -> Result<()> {
        if self.x.shape() != out {
            return Err(Error::shape(op, format!("residual {:?} for a linear output of {out:?}", self.x.shape())));
        }
        check::per_sample(op, self.x, self.gate)
    }

    /// Whether the gated kernels can take it (their tokens per sample are a 32-bit count).
    pub(super) fn fits_kernels(&self) -> bool {
        self.x.dim(1) <= i32::MAX as usize
    }

    /// The gated kernels' operands (after `check`).
    pub(super) fn operands(&self, be: &CudaBackend, op: &'static str) -> Result<GatedOperands> {
        let (x, xp) = be.bf16_arg(self.x, op)?;
        let (g, gp, gs) = be.vec_arg(self.gate, op)?;
        Ok(GatedOperands { args: GatedArgs { x: xp, gate: (gp, gs), l: self.x.dim(1) as i32 }, _keep: [x, g] })
    }

    /// The composition where no gated kernel applies: `gated_add(x, gate, y)`.
    pub(super) fn add(&self, be: &CudaBackend, y: &Tensor) -> Result<Tensor> {
        super::pointwise::gated_add(be, self.x, self.gate, y)
    }
}

/// Bias handling of the GEMM epilogue.
#[derive(Clone, Copy)]
pub(super) enum Bias {
    None,
    PerColumn(u64),
    PerRow(u64),
}

impl Bias {
    pub(super) fn args(self) -> (u64, i32) {
        match self {
            Bias::None => (0, 0),
            Bias::PerColumn(p) => (p, 1),
            Bias::PerRow(p) => (p, 2),
        }
    }
}

/// C[m, n] (leading dimension ldc) = Σ_k A[m, k] · W[n, k] + bias, all bf16, f32 accumulation.
/// v3 (wgmma) on sm_90a images; the tensor-core kernels need K % 8 == 0 and 16-byte aligned
/// operands; otherwise the tiled one.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    be: &CudaBackend,
    a: u64,
    w: u64,
    bias: Bias,
    c: u64,
    m: usize,
    n: usize,
    k: usize,
    ldc: usize,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if super::gemm_wgmma::applies(be, a, w, k * 2, m) {
        return super::gemm_wgmma::bf16(be, a, w, bias, c, m, n, k, ldc);
    }
    let (bp, mode) = bias.args();
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    match bf16_mma_grid(a, w, m, n, k) {
        Some(cfg) => launch!(be.dev, "gemm_mma_bf16", cfg, a, w, bp, mode, c, m32, n32, k32, ldc as i64),
        None => {
            launch!(be.dev, "gemm_tiled_bf16", tiled_16x16("gemm", m, n)?, a, w, bp, mode, c, m32, n32, k32, ldc as i64)
        }
    }
}

/// Grid of the 128x128-tile tensor-core GEMMs (kernels/mma_tile.cuh): one 256-thread block per
/// output tile, rows on the y axis; None when the rows exceed one grid.
pub(super) fn mma_tile_grid(m: usize, n: usize) -> Option<LaunchConfig> {
    (m.div_ceil(128) <= 65535).then(|| LaunchConfig {
        grid_dim: (n.div_ceil(128) as u32, m.div_ceil(128) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The grid of a bf16 tensor-core GEMM (`gemm_mma_bf16` and its gated-epilogue twin) when its
/// operands allow it: K % 8 == 0 and A, W 16-byte aligned.
fn bf16_mma_grid(a: u64, w: u64, m: usize, n: usize, k: usize) -> Option<LaunchConfig> {
    let operands = k.is_multiple_of(8) && a.is_multiple_of(16) && w.is_multiple_of(16);
    operands.then(|| mma_tile_grid(m, n)).flatten()
}

/// Grid of the 16x16-tile CUDA-core GEMMs (bf16 fallback, weight-only quantized, W8A8): one block
/// per output tile, rows on the y axis.
pub(super) fn tiled_16x16(op: &'static str, m: usize, n: usize) -> Result<LaunchConfig> {
    if m.div_ceil(16) > 65535 {
        return Err(Error::shape(op, format!("{m} rows exceed one grid of the 16x16 tiled kernel")));
    }
    Ok(LaunchConfig {
        grid_dim: (n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1),
        block_dim: (16, 16, 1),
        shared_mem_bytes: 0,
    })
}

/// The `[.., N]` bf16 output of a linear with input `x` `[.., K]`.
pub(super) fn linear_output(be: &CudaBackend, x: &Tensor, n: usize) -> Result<Tensor> {
    be.output(DType::BF16, &linear_output_shape(x, n))
}

pub(super) fn linear(be: &CudaBackend, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, k, n) = check::linear(x, w, bias)?;
    let (_x, xp) = be.bf16_arg(x, "linear")?;
    let (_w, wp) = be.bf16_arg(w, "linear")?;
    let b = bias.map(|b| be.bf16_arg(b, "linear")).transpose()?;
    let out = linear_output(be, x, n)?;
    let bias = b.as_ref().map_or(Bias::None, |(_, p)| Bias::PerColumn(*p));
    gemm(be, xp, wp, bias, be.ptr(&out)?, m, n, k, n)?;
    Ok(out)
}

/// `x + gate · linear(a, w, bias)` with the gated residual in the tensor-core GEMM's epilogue
/// (`gemm_mma_gated_bf16`, or its v3 `gemm_wgmma_gated_bf16` on sm_90a); the composition where
/// those kernels do not apply (K % 8 != 0, unaligned operands).
pub(super) fn linear_gated_add(
    be: &CudaBackend,
    x: &Tensor,
    gate: &Tensor,
    a: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (m, k, n) = check::linear(a, w, bias)?;
    let residual = Residual { x, gate };
    residual.check("linear_gated_add", &linear_output_shape(a, n))?;
    let (_a, ap) = be.bf16_arg(a, "linear_gated_add")?;
    let (_w, wp) = be.bf16_arg(w, "linear_gated_add")?;
    let cfg = match bf16_mma_grid(ap, wp, m, n, k) {
        Some(cfg) if residual.fits_kernels() => cfg,
        _ => return residual.add(be, &linear(be, a, w, bias)?),
    };
    let gated = residual.operands(be, "linear_gated_add")?;
    let b = bias.map(|b| be.bf16_arg(b, "linear_gated_add")).transpose()?;
    let bp = b.as_ref().map_or(0, |(_, p)| *p);
    let out = be.output(DType::BF16, x.shape())?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let op = be.ptr(&out)?;
    if super::gemm_wgmma::applies(be, ap, wp, k * 2, m) {
        super::gemm_wgmma::gated_bf16(be, ap, wp, bp, gated.args, op, (m, n, k))?;
        return Ok(out);
    }
    let GatedArgs { x: xp, gate: (gp, gs), l } = gated.args;
    launch!(be.dev, "gemm_mma_gated_bf16", cfg, ap, wp, bp, xp, gp, gs, l, op, m as i32, n as i32, k as i32)?;
    Ok(out)
}

/// The output shape of a linear of `x` `[.., K]` to `n` features.
pub(super) fn linear_output_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    shape
}

/// `x · dequant(w)ᵀ (+ bias)` with the weight-only quantized kernels (codes dequantized into shared
/// memory tile by tile, f32 accumulation): v2 on tensor cores where K % 16 == 0, the operands are
/// 16-byte aligned and an int4 group is a multiple of 16; else v1 (CUDA cores, any shape).
pub(super) fn linear_quantized(be: &CudaBackend, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, k, n) = check::linear_quantized("linear_quantized", x, w, bias)?;
    let (_x, xp) = be.bf16_arg(x, "linear_quantized")?;
    let sp = match (&w.scales, w.format) {
        (Some(s), _) => be.ptr(s)?,
        // GGML blocks hold their own scales.
        (None, crate::quant::QuantFormat::Ggml(_)) => 0,
        (None, _) => return Err(Error::Gpu("quantized weight without scales".into())),
    };
    let codes = be.ptr(&w.data)?;
    let b = bias.map(|b| be.bf16_arg(b, "linear_quantized")).transpose()?;
    let (bp, mode) = b.as_ref().map_or((0, 0), |(_, p)| (*p, 1));
    let out = linear_output(be, x, n)?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    let (fmt, group) = (w.format.id(), w.format.group() as i32);
    let group_ok = !matches!(w.format, crate::quant::QuantFormat::Int4 { group } if group % 16 != 0);
    let operands = k.is_multiple_of(16) && xp.is_multiple_of(16) && codes.is_multiple_of(16) && group_ok;
    let (kernel, cfg) = match operands.then(|| mma_tile_grid(m, n)).flatten() {
        Some(cfg) => ("gemm_wq_mma_bf16", cfg),
        None => ("gemm_wq_tiled_bf16", tiled_16x16("linear_quantized", m, n)?),
    };
    launch!(
        be.dev,
        kernel,
        cfg,
        xp,
        codes,
        sp,
        fmt,
        group,
        bp,
        mode,
        be.ptr(&out)?,
        m as i32,
        n as i32,
        k as i32,
        n as i64
    )?;
    Ok(out)
}
