//! Launchers for the element-wise, broadcast and position kernels (kernels/elementwise.cu).

use super::{grid_1d, launch, CudaBackend};
use crate::backend::check;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The v2 (x8) element-wise kernels apply: every pointer 16-byte aligned, every length and row
/// stride (in elements) a multiple of 8.
pub(super) fn vec8(ptrs: &[u64], lens: &[i64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0) && lens.iter().all(|n| n % 8 == 0)
}

pub(super) fn silu(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    let (x, xp) = be.bf16_arg(x, "silu")?;
    let out = be.output(DType::BF16, x.shape())?;
    let (n, op) = (x.numel(), be.ptr(&out)?);
    if vec8(&[xp, op], &[n as i64]) {
        launch!(be.dev, "silu_bf16x8", grid_1d(n / 8), xp, op, (n / 8) as i64)?;
    } else {
        launch!(be.dev, "silu_bf16", grid_1d(n), xp, op, n as i64)?;
    }
    Ok(out)
}

/// Pointer and row stride of a bf16 view whose rows the x8 kernels can read in place (see
/// `Tensor::row_stride`); None for other layouts and dtypes.
pub(super) fn bf16_rows(be: &CudaBackend, x: &Tensor) -> Result<Option<(u64, usize)>> {
    match (x.row_stride(), x.dtype()) {
        (Some(ld), DType::BF16) => Ok(Some((be.ptr(x)?, ld))),
        _ => Ok(None),
    }
}

/// silu(x[.., :m]) · x[.., m:]: the v2 kernel reads a strided view (the DiT's slice of its fused
/// projection) in place; otherwise the view is made dense first.
pub(super) fn swiglu(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    let m = check::swiglu(x)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = m;
    let out = be.output(DType::BF16, &shape)?;
    let (rows, op) = (x.rows(), be.ptr(&out)?);
    if let Some((xp, ld)) = bf16_rows(be, x)? {
        if vec8(&[xp, op], &[ld as i64, m as i64]) {
            launch!(be.dev, "swiglu_bf16x8", grid_1d(rows * m / 8), xp, ld as i64, op, rows as i64, m as i32)?;
            return Ok(out);
        }
    }
    let (_x, xp) = be.bf16_arg(x, "swiglu")?;
    if vec8(&[xp, op], &[m as i64]) {
        launch!(be.dev, "swiglu_bf16x8", grid_1d(rows * m / 8), xp, (2 * m) as i64, op, rows as i64, m as i32)?;
    } else {
        launch!(be.dev, "swiglu_bf16", grid_1d(rows * m), xp, op, rows as i64, m as i32)?;
    }
    Ok(out)
}

/// `[prefix | swiglu(x)]`: one kernel writing both parts where x is an aligned row view and both
/// widths are multiples of 8; else the composition.
pub(super) fn swiglu_concat(be: &CudaBackend, prefix: &Tensor, x: &Tensor) -> Result<Tensor> {
    let m = check::swiglu(x)?;
    let r = x.rank();
    let same_rows = prefix.rank() == r && r >= 1 && prefix.shape()[..r - 1] == x.shape()[..r - 1];
    if !same_rows {
        return Err(Error::shape("swiglu_concat", format!("prefix {:?} beside {:?}", prefix.shape(), x.shape())));
    }
    let p = prefix.last_dim();
    let (_pre, pp) = be.bf16_arg(prefix, "swiglu_concat")?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = p + m;
    if let Some((xp, ld)) = bf16_rows(be, x)? {
        let out = be.output(DType::BF16, &shape)?;
        let (rows, op) = (x.rows(), be.ptr(&out)?);
        if vec8(&[pp, xp, op], &[ld as i64, m as i64, p as i64]) {
            let (ld, rows64) = (ld as i64, rows as i64);
            launch!(
                be.dev,
                "swiglu_concat_bf16x8",
                grid_1d(rows * (p + m) / 8),
                pp,
                xp,
                ld,
                op,
                rows64,
                p as i32,
                m as i32
            )?;
            return Ok(out);
        }
    }
    let act = swiglu(be, x)?;
    super::layout::concat(be, &[prefix, &act], r - 1)
}

pub(super) fn axpby(be: &CudaBackend, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    check::same_shape("axpby", x, y)?;
    let (x, xp) = be.bf16_arg(x, "axpby")?;
    let (_y, yp) = be.bf16_arg(y, "axpby")?;
    let out = be.output(DType::BF16, x.shape())?;
    let (n, op) = (x.numel(), be.ptr(&out)?);
    if vec8(&[xp, yp, op], &[n as i64]) {
        launch!(be.dev, "axpby_bf16x8", grid_1d(n / 8), a, xp, b, yp, op, (n / 8) as i64)?;
    } else {
        launch!(be.dev, "axpby_bf16", grid_1d(n), a, xp, b, yp, op, n as i64)?;
    }
    Ok(out)
}

pub(super) fn gated_add(be: &CudaBackend, x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    check::same_shape("gated_add", x, y)?;
    check::per_sample("gated_add", x, gate)?;
    let (x, xp) = be.bf16_arg(x, "gated_add")?;
    let (_y, yp) = be.bf16_arg(y, "gated_add")?;
    let (_g, gp, gs) = be.vec_arg(gate, "gated_add")?;
    let out = be.output(DType::BF16, x.shape())?;
    let (n, l, c, op) = (x.numel(), x.dim(1), x.dim(2), be.ptr(&out)?);
    if vec8(&[xp, yp, gp, op], &[c as i64, gs]) && l <= i32::MAX as usize {
        let n8 = (n / 8) as i64;
        launch!(be.dev, "gated_add_bf16x8", grid_1d(n / 8), xp, gp, gs, yp, op, l as i32, c as i32, n8)?;
    } else {
        launch!(be.dev, "gated_add_bf16", grid_1d(n), xp, gp, gs, yp, op, l as i64, c as i32, n as i64)?;
    }
    Ok(out)
}

pub(super) fn modulate(be: &CudaBackend, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    check::per_sample("modulate", x, shift)?;
    check::per_sample("modulate", x, scale)?;
    let (x, xp) = be.bf16_arg(x, "modulate")?;
    let (_s, sp, ss) = be.vec_arg(shift, "modulate")?;
    let (_c, cp, cs) = be.vec_arg(scale, "modulate")?;
    let out = be.output(DType::BF16, x.shape())?;
    let (n, l, c, op) = (x.numel(), x.dim(1), x.dim(2), be.ptr(&out)?);
    if vec8(&[xp, sp, cp, op], &[c as i64, ss, cs]) && l <= i32::MAX as usize {
        let n8 = (n / 8) as i64;
        launch!(be.dev, "modulate_bf16x8", grid_1d(n / 8), xp, sp, ss, cp, cs, op, l as i32, c as i32, n8)?;
    } else {
        launch!(be.dev, "modulate_bf16", grid_1d(n), xp, sp, ss, cp, cs, op, l as i64, c as i32, n as i64)?;
    }
    Ok(out)
}

pub(super) fn channel_affine(be: &CudaBackend, x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<Tensor> {
    check::channel_affine(x, mul, add)?;
    let c = x.dim(1);
    let (x, xp) = be.bf16_arg(x, "channel_affine")?;
    let (_m, mp) = be.f32_arg(mul, "channel_affine")?;
    let (_a, ap) = be.f32_arg(add, "channel_affine")?;
    let out = be.output(DType::BF16, x.shape())?;
    let n = x.numel();
    let hw = (x.dim(2) * x.dim(3)) as i64;
    launch!(be.dev, "channel_affine_bf16", grid_1d(n), xp, mp, ap, be.ptr(&out)?, hw, c as i32, n as i64)?;
    Ok(out)
}

pub(super) fn upsample_nearest2x(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    check::rank("upsample_nearest2x", x, 4)?;
    let (x, xp) = be.bf16_arg(x, "upsample_nearest2x")?;
    let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let out = be.output(DType::BF16, &[b, c, 2 * h, 2 * w])?;
    let op = be.ptr(&out)?;
    // v2 (8 output pixels per thread) for rows of a multiple of 4 input pixels.
    if w % 4 == 0 && xp % 16 == 0 && op % 16 == 0 && 2 * h.max(w) <= i32::MAX as usize {
        let n8 = out.numel() / 8;
        return launch!(be.dev, "upsample_nearest2x_bf16x8", grid_1d(n8), xp, op, h as i32, w as i32, n8 as i64)
            .map(|_| out);
    }
    launch!(
        be.dev,
        "upsample_nearest2x_bf16",
        grid_1d(out.numel()),
        xp,
        be.ptr(&out)?,
        (b * c) as i64,
        h as i32,
        w as i32
    )?;
    Ok(out)
}

pub(super) fn rope(be: &CudaBackend, x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let op = if interleaved { "rope_interleaved" } else { "rope_half" };
    check::rope(op, x, cos, sin)?;
    let (x, xp) = be.bf16_arg(x, op)?;
    let (_c, cp) = be.f32_arg(cos, op)?;
    let (_s, sp) = be.f32_arg(sin, op)?;
    let out = be.output(DType::BF16, x.shape())?;
    let (n, h, d) = (x.dim(1), x.dim(2), x.dim(3));
    let rows = x.numel() / d;
    launch!(
        be.dev,
        "rope_bf16",
        grid_1d(rows * d / 2),
        xp,
        cp,
        sp,
        be.ptr(&out)?,
        rows as i64,
        n as i32,
        h as i32,
        d as i32,
        interleaved as i32
    )?;
    Ok(out)
}

pub(super) fn timestep_embedding(be: &CudaBackend, t: &Tensor, dim: usize, max_period: f32) -> Result<Tensor> {
    check::timestep_embedding(t, dim)?;
    let (_t, tp) = be.f32_arg(t, "timestep_embedding")?;
    let batch = t.dim(0);
    let out = be.output(DType::BF16, &[batch, dim])?;
    let neg_log = -(max_period as f64).ln() as f32;
    let rows = i32::try_from(batch).map_err(|_| Error::shape("timestep_embedding", format!("{batch} timesteps")))?;
    launch!(be.dev, "timestep_embedding_bf16", grid_1d(batch * dim), tp, be.ptr(&out)?, rows, dim as i32, neg_log)?;
    Ok(out)
}

pub(super) fn embedding(be: &CudaBackend, ids: &[u32], table: &Tensor) -> Result<Tensor> {
    check::embedding(ids, table)?;
    let c = table.dim(1);
    let (_t, tp) = be.bf16_arg(table, "embedding")?;
    let ids_dev = be.upload_bytes(bytemuck::cast_slice(ids), DType::F32, &[ids.len()])?; // 4-byte ids
    let out = be.output(DType::BF16, &[ids.len(), c])?;
    launch!(
        be.dev,
        "embedding_bf16",
        grid_1d(ids.len() * c),
        be.ptr(&ids_dev)?,
        tp,
        be.ptr(&out)?,
        ids.len() as i64,
        c as i32
    )?;
    Ok(out)
}
