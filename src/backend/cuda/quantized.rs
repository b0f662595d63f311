//! Launchers for the FP8 W8A8 linears (kernels/quantized.cu; v3 on Hopper in gemm_wgmma.rs). Sage
//! attention's are in sage.rs.

use super::gemm::{linear_output_shape, Residual};
use super::gemm_wgmma::GatedArgs;
use super::{launch, CudaBackend};
use crate::backend::{check, swiglu_beside, QuantTensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Kernel images whose architecture has e4m3 tensor cores (mma.sync m16n8k32 e4m3: sm_89+). The
/// compute_80 PTX does not, whatever card JIT-compiles it.
pub(super) fn has_fp8_mma(target: &str) -> bool {
    matches!(target, "sm_89" | "sm_90a" | "sm_120")
}

/// FP8 W8A8 linear: v2 (per-token e4m3 codes, tensor cores) where the image has e4m3 mma and rows
/// split into 16-byte chunks; else v1 (CUDA cores, any shape). Same numerics up to f32 rounding.
/// With `residual`, `x + gate · linear` with the residual in v2's (and v3's) epilogue.
pub(super) fn linear_fp8(
    be: &CudaBackend,
    x: &Tensor,
    w: &QuantTensor,
    bias: Option<&Tensor>,
    residual: Option<Residual>,
) -> Result<Tensor> {
    let (m, k, n) = check::linear_fp8(x, w, bias)?;
    if let Some(r) = residual {
        r.check("linear_fp8_gated_add", &linear_output_shape(x, n))?;
        if !(fp8_mma_applies(be, m, k) && r.fits_kernels()) {
            return r.add(be, &linear_fp8(be, x, w, bias, None)?);
        }
    }
    let name = if residual.is_some() { "linear_fp8_gated_add" } else { "linear_fp8" };
    let (_x, xp) = be.bf16_arg(x, name)?;
    let scales = w.scales.as_ref().ok_or_else(|| Error::Gpu("fp8 weight without scales".into()))?;
    let b = bias.map(|b| be.bf16_arg(b, name)).transpose()?;
    let bp = b.as_ref().map_or(0, |(_, p)| *p);
    let rows = super::reduce::per_row(name, m, k)?;
    let out = super::gemm::linear_output(be, x, n)?;
    if fp8_mma_applies(be, m, k) {
        let gated = residual.map(|r| r.operands(be, name)).transpose()?;
        let codes = be.output(DType::U8, &[m * k])?;
        let a_scale = be.output(DType::F32, &[m])?;
        let (qp, asp) = (be.ptr(&codes)?, be.ptr(&a_scale)?);
        launch!(be.dev, "quantize_rows_e4m3_bf16", rows, xp, qp, asp, k as i32)?;
        w8a8_mma(be, qp, asp, w, bp, &out, (m, n, k), gated.as_ref().map(|g| g.args))?;
        return Ok(out);
    }
    let absmax = be.output(DType::F32, &[m])?;
    launch!(be.dev, "row_absmax_bf16", rows, xp, be.ptr(&absmax)?, k as i32)?;
    let cfg = super::gemm::tiled_16x16(name, m, n)?;
    let (ap, wp, sp, op) = (be.ptr(&absmax)?, be.ptr(&w.data)?, be.ptr(scales)?, be.ptr(&out)?);
    launch!(be.dev, "gemm_w8a8_tiled_bf16", cfg, xp, ap, wp, sp, bp, op, m as i32, n as i32, k as i32, n as i64)?;
    Ok(out)
}

/// v2 of the FP8 linear applies: e4m3 tensor cores in the image, K in 16-byte rows of codes, the
/// rows within one grid of the tensor-core tile.
pub(super) fn fp8_mma_applies(be: &CudaBackend, m: usize, k: usize) -> bool {
    has_fp8_mma(be.dev.target) && k.is_multiple_of(16) && super::gemm::mma_tile_grid(m, 1).is_some()
}

/// `gemm_w8a8_mma_e4m3` (or its v3, `gemm_wgmma_e4m3`, on sm_90a): out [m, n] from per-token e4m3
/// codes `qp` with scales `asp`; with `gated`, their gated-residual twins.
#[allow(clippy::too_many_arguments)]
pub(super) fn w8a8_mma(
    be: &CudaBackend,
    qp: u64,
    asp: u64,
    w: &QuantTensor,
    bp: u64,
    out: &Tensor,
    (m, n, k): (usize, usize, usize),
    gated: Option<GatedArgs>,
) -> Result<()> {
    let scales = w.scales.as_ref().ok_or_else(|| Error::Gpu("fp8 weight without scales".into()))?;
    let (wp, sp, op) = (be.ptr(&w.data)?, be.ptr(scales)?, be.ptr(out)?);
    if super::gemm_wgmma::applies(be, qp, wp, k, m) {
        return super::gemm_wgmma::e4m3(be, qp, asp, wp, sp, bp, op, (m, n, k), gated);
    }
    let cfg = super::gemm::mma_tile_grid(m, n)
        .ok_or_else(|| Error::shape("linear_fp8", format!("{m} rows exceed one grid of the tensor-core tile")))?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    match gated {
        None => launch!(be.dev, "gemm_w8a8_mma_e4m3", cfg, qp, asp, wp, sp, bp, op, m32, n32, k32, n as i64),
        Some(GatedArgs { x, gate: (gp, gs), l }) => {
            launch!(be.dev, "gemm_w8a8_mma_gated_e4m3", cfg, qp, asp, wp, sp, bp, x, gp, gs, l, op, m32, n32, k32)
        }
    }
}

/// adaLN feeding an FP8 linear: with v2, `layer_norm_modulate_e4m3_bf16` writes the activation's
/// e4m3 codes and scales straight from x (no bf16 activation), then the tensor-core GEMM; else the
/// two ops.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_modulate_linear_fp8(
    be: &CudaBackend,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
    w: &QuantTensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    check::per_sample("layer_norm_modulate", x, shift)?;
    check::per_sample("layer_norm_modulate", x, scale)?;
    let (m, k, n) = check::linear_fp8(x, w, bias)?;
    if !fp8_mma_applies(be, m, k) {
        let a = super::reduce::layer_norm(be, x, Some((shift, scale)), eps)?;
        return linear_fp8(be, &a, w, bias, None);
    }
    let (_x, xp) = be.bf16_arg(x, "layer_norm_modulate_linear_fp8")?;
    let (_s, sp, ss) = be.vec_arg(shift, "layer_norm_modulate_linear_fp8")?;
    let (_c, cp, cs) = be.vec_arg(scale, "layer_norm_modulate_linear_fp8")?;
    let b = bias.map(|b| be.bf16_arg(b, "layer_norm_modulate_linear_fp8")).transpose()?;
    let bp = b.as_ref().map_or(0, |(_, p)| *p);
    let out = super::gemm::linear_output(be, x, n)?;
    let codes = be.output(DType::U8, &[m * k])?;
    let a_scale = be.output(DType::F32, &[m])?;
    let (qp, asp) = (be.ptr(&codes)?, be.ptr(&a_scale)?);
    let rows = super::reduce::per_row("layer_norm_modulate_linear_fp8", m, k)?;
    let per_sample = x.dim(1) as i64;
    launch!(be.dev, "layer_norm_modulate_e4m3_bf16", rows, xp, sp, cp, ss, cs, per_sample, eps, qp, asp, k as i32)?;
    w8a8_mma(be, qp, asp, w, bp, &out, (m, n, k), None)?;
    Ok(out)
}

/// The feed-forward's activation feeding an FP8 linear, `[prefix | swiglu(x)]` (or `swiglu(x)`):
/// with v2, `swiglu_concat_e4m3_bf16` writes its e4m3 codes and scales straight from the fused
/// projection's rows (no bf16 activation), then the tensor-core GEMM (with `residual`, the gated
/// residual in its epilogue); else the composition.
pub(super) fn swiglu_linear_fp8(
    be: &CudaBackend,
    prefix: Option<&Tensor>,
    x: &Tensor,
    w: &QuantTensor,
    bias: Option<&Tensor>,
    residual: Option<Residual>,
) -> Result<Tensor> {
    let m = check::swiglu(x)?;
    let r = x.rank();
    let p = match prefix {
        Some(pre) if pre.rank() == r && pre.shape()[..r - 1] == x.shape()[..r - 1] => pre.last_dim(),
        Some(pre) => {
            return Err(Error::shape("swiglu_linear_fp8", format!("prefix {:?} beside {:?}", pre.shape(), x.shape())))
        }
        None => 0,
    };
    let (rows, k, n) = (x.rows(), p + m, w.rows);
    let fused = fp8_mma_applies(be, rows, k) && residual.is_none_or(|r| r.fits_kernels());
    let rows_fit = super::pointwise::bf16_rows(be, x)?.filter(|_| fused);
    let Some((xp, ld)) = rows_fit else {
        return linear_fp8(be, &swiglu_beside(be, prefix, x)?, w, bias, residual);
    };
    if w.format != crate::quant::QuantFormat::Fp8 || w.cols != k {
        let what = format!("{k} activation columns against a {:?} weight [{n}, {}]", w.format, w.cols);
        return Err(Error::shape("swiglu_linear_fp8", what));
    }
    if bias.is_some_and(|b| b.rank() != 1 || b.dim(0) != n) {
        return Err(Error::shape("swiglu_linear_fp8", format!("bias for {n} outputs")));
    }
    let (_pre, pp) = match prefix {
        Some(pre) => {
            let (t, ptr) = be.bf16_arg(pre, "swiglu_linear_fp8")?;
            (Some(t), ptr)
        }
        None => (None, 0),
    };
    let b = bias.map(|b| be.bf16_arg(b, "swiglu_linear_fp8")).transpose()?;
    let bp = b.as_ref().map_or(0, |(_, p)| *p);
    let shape = linear_output_shape(x, n);
    let name = "swiglu_linear_fp8_gated_add";
    let gated = residual.map(|r| r.check(name, &shape).and_then(|_| r.operands(be, name))).transpose()?;
    let out = be.output(DType::BF16, &shape)?;
    let codes = be.output(DType::U8, &[rows * k])?;
    let a_scale = be.output(DType::F32, &[rows])?;
    let (qp, asp) = (be.ptr(&codes)?, be.ptr(&a_scale)?);
    let grid = super::reduce::per_row("swiglu_linear_fp8", rows, k)?;
    launch!(be.dev, "swiglu_concat_e4m3_bf16", grid, pp, p as i32, xp, ld as i64, m as i32, qp, asp)?;
    w8a8_mma(be, qp, asp, w, bp, &out, (rows, n, k), gated.as_ref().map(|g| g.args))?;
    Ok(out)
}
