//! Launchers for the normalisation kernels (kernels/norm.cu).

use cudarc::driver::LaunchConfig;

use super::{grid_1d, launch, CudaBackend};
use crate::backend::{check, RopePairs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One block per row, threads = the row length rounded up to a warp (at most 256).
/// One block per row of `c` elements (up to 8 warps striding over the row).
pub(super) fn per_row(op: &'static str, rows: usize, c: usize) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize {
        return Err(Error::shape(op, format!("{rows} rows exceed one grid")));
    }
    let threads = c.div_ceil(32).clamp(1, 8) * 32;
    Ok(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 })
}

pub(super) fn layer_norm(
    be: &CudaBackend,
    x: &Tensor,
    modulation: Option<(&Tensor, &Tensor)>,
    eps: f32,
) -> Result<Tensor> {
    let (x, xp) = be.bf16_arg(x, "layer_norm")?;
    let (c, rows) = (x.last_dim(), x.rows());
    let out = be.output(DType::BF16, x.shape())?;
    let cfg = per_row("layer_norm", rows, c)?;
    match modulation {
        None => {
            launch!(be.dev, "layer_norm_bf16", cfg, xp, be.ptr(&out)?, c as i32, eps, 0u64, 0u64, 0i64, 0i64, 1i64)?
        }
        Some((shift, scale)) => {
            check::per_sample("layer_norm_modulate", &x, shift)?;
            check::per_sample("layer_norm_modulate", &x, scale)?;
            let (_s, sp, ss) = be.vec_arg(shift, "layer_norm_modulate")?;
            let (_c, cp, cs) = be.vec_arg(scale, "layer_norm_modulate")?;
            let (op, rows_per_sample) = (be.ptr(&out)?, x.dim(1) as i64);
            launch!(be.dev, "layer_norm_bf16", cfg, xp, op, c as i32, eps, sp, cp, ss, cs, rows_per_sample)?;
        }
    }
    Ok(out)
}

pub(super) fn rms_norm(be: &CudaBackend, x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    check::rms_weight(x, weight)?;
    let c = x.last_dim();
    let (x, xp) = be.bf16_arg(x, "rms_norm")?;
    let w = weight.map(|w| be.bf16_arg(w, "rms_norm")).transpose()?;
    let wp = w.as_ref().map_or(0, |(_, p)| *p);
    let out = be.output(DType::BF16, x.shape())?;
    launch!(be.dev, "rms_norm_bf16", per_row("rms_norm", x.rows(), c)?, xp, wp, be.ptr(&out)?, c as i32, eps)?;
    Ok(out)
}

/// `rms_norm` then RoPE in one kernel (`rms_norm_rope_bf16`), reading x in place when its heads
/// are contiguous rows of d and its tokens evenly spaced (a q/k slice of a fused projection);
/// other layouts are made dense first.
#[allow(clippy::too_many_arguments)]
pub(super) fn rms_norm_rope(
    be: &CudaBackend,
    x: &Tensor,
    weight: Option<&Tensor>,
    eps: f32,
    cos: &Tensor,
    sin: &Tensor,
    pairs: RopePairs,
) -> Result<Tensor> {
    check::rope("rms_norm_rope", x, cos, sin)?;
    check::rms_weight(x, weight)?;
    let (b, l, h, d) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let rows = b * l * h;
    if [l, h, d, rows.div_ceil(8)].iter().any(|&n| n > i32::MAX as usize) {
        return Err(Error::shape("rms_norm_rope", format!("{:?} exceeds the kernel's 32-bit grid", x.shape())));
    }
    let (x, ld) = token_rows(be, x, "rms_norm_rope")?;
    let xp = be.ptr(&x)?;
    let w = weight.map(|w| be.bf16_arg(w, "rms_norm_rope")).transpose()?;
    let wp = w.as_ref().map_or(0, |(_, p)| *p);
    let (_c, cp) = be.f32_arg(cos, "rms_norm_rope")?;
    let (_s, sp) = be.f32_arg(sin, "rms_norm_rope")?;
    let out = be.output(DType::BF16, &[b, l, h, d])?;
    let cfg = super::warp_per_row(rows);
    let interleaved = (pairs == RopePairs::Interleaved) as i32;
    launch!(
        be.dev,
        "rms_norm_rope_bf16",
        cfg,
        xp,
        ld as i64,
        wp,
        cp,
        sp,
        be.ptr(&out)?,
        rows as i64,
        l as i32,
        h as i32,
        d as i32,
        eps,
        interleaved
    )?;
    Ok(out)
}

/// Token stride (elements) of `[B, L, H, d]` whose d is contiguous, heads d apart and tokens
/// evenly spaced across B and L; None otherwise.
pub(super) fn token_stride(x: &Tensor) -> Option<usize> {
    let (s, d) = (x.strides(), x.dim(3));
    let (b, l, h) = (x.dim(0), x.dim(1), x.dim(2));
    let inner = (s[3] == 1 || d == 1) && (s[2] == d || h == 1);
    let ld = if l > 1 {
        s[1]
    } else if b > 1 {
        s[0]
    } else {
        h * d
    };
    (inner && (b == 1 || l == 1 || s[0] == ld * l)).then_some(ld)
}

/// `x` `[B, L, H, d]` as bf16 token rows `ld` elements apart: in place where `token_stride` allows
/// (a slice of a fused projection), else a dense bf16 copy (ld = H·d).
pub(super) fn token_rows(be: &CudaBackend, x: &Tensor, op: &'static str) -> Result<(Tensor, usize)> {
    match token_stride(x) {
        Some(ld) if x.dtype() == DType::BF16 => Ok((x.clone(), ld)),
        _ => Ok((be.bf16_arg(x, op)?.0, x.dim(2) * x.dim(3))),
    }
}

pub(super) fn group_norm(
    be: &CudaBackend,
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    check::group_norm(x, groups, weight, bias)?;
    let (b, c, hw) = (x.dim(0), x.dim(1), x.dim(2) * x.dim(3));
    let (x, xp) = be.bf16_arg(x, "group_norm")?;
    let (_w, wp) = be.bf16_arg(weight, "group_norm")?;
    let (_b, bp) = be.bf16_arg(bias, "group_norm")?;
    let group_size = c / groups * hw;
    // f64 (sum, sum of squares) per group, accumulated by chunk blocks.
    let mut stats = be.alloc(DType::F32, 4 * b * groups)?; // 2 doubles per group
    be.dev.stream.memset_zeros(&mut stats.buf).map_err(super::gpu_err)?;
    let chunk = 16384usize;
    let chunks = group_size.div_ceil(chunk);
    let cfg =
        LaunchConfig { grid_dim: (chunks as u32, (b * groups) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let sp = stats.base_ptr();
    launch!(be.dev, "group_norm_stats_bf16", cfg, xp, sp, group_size as i64, chunk as i64)?;
    // Mean and 1/std per group in f32, so the per-element pass does no f64 math.
    let n_groups = b * groups;
    let mean_rstd = be.output(DType::F32, &[n_groups, 2])?;
    let mp = be.ptr(&mean_rstd)?;
    let finalize =
        LaunchConfig { grid_dim: (n_groups.div_ceil(128) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    launch!(be.dev, "group_norm_finalize_bf16", finalize, xp, sp, mp, group_size as i64, eps, n_groups as i32)?;
    drop(stats);
    let out = be.output(DType::BF16, x.shape())?;
    let (n, op) = (x.numel(), be.ptr(&out)?);
    // v2 (8 pixels of one channel per thread) for planes of a multiple of 8 pixels.
    if super::pointwise::vec8(&[xp, op], &[hw as i64]) && hw <= i32::MAX as usize {
        let (c, g, hw, silu) = (c as i32, groups as i32, hw as i32, silu as i32);
        let n8 = (n / 8) as i64;
        launch!(be.dev, "group_norm_apply_bf16x8", grid_1d(n / 8), xp, mp, wp, bp, op, c, g, hw, silu, n8)?;
    } else {
        let (c, g, hw, silu) = (c as i32, groups as i32, hw as i64, silu as i32);
        launch!(be.dev, "group_norm_apply_bf16", grid_1d(n), xp, mp, wp, bp, op, c, g, hw, silu, n as i64)?;
    }
    Ok(out)
}
