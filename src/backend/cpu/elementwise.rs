//! Element-wise and broadcast ops.

use super::{dense, fast_math, output, par_filled};
use crate::backend::check;
use crate::error::Result;
use crate::tensor::Tensor;

#[inline]
pub fn silu_f32(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Elements per task of the element-wise ops.
const CHUNK: usize = 1 << 14;

/// SiLU; `fast` (the bf16 precision path): the polynomial one, 16 lanes wide.
pub fn silu(x: &Tensor, fast: bool) -> Result<Tensor> {
    let xv = dense("silu", x)?;
    let y = par_filled(xv.len(), CHUNK, |i, y| {
        let x = &xv[i * CHUNK..][..y.len()];
        match fast {
            true => fast_math::vectorised(|| y.iter_mut().zip(x).for_each(|(y, &v)| *y = fast_math::silu(v))),
            false => y.iter_mut().zip(x).for_each(|(y, &v)| *y = silu_f32(v)),
        }
    });
    output(y, x.shape())
}

/// SiLU(gate) · value over the two halves of the last axis; `fast` as in `silu`.
pub fn swiglu(x: &Tensor, fast: bool) -> Result<Tensor> {
    let m = check::swiglu(x)?;
    let two_m = 2 * m;
    let xv = dense("swiglu", x)?;
    let y = par_filled(xv.len() / 2, m, |i, y| {
        let x = &xv[i * two_m..][..two_m];
        let (gate, value) = x.split_at(m);
        let pairs = y.iter_mut().zip(gate.iter().zip(value));
        match fast {
            true => fast_math::vectorised(|| pairs.for_each(|(y, (&g, &v))| *y = fast_math::silu(g) * v)),
            false => pairs.for_each(|(y, (&g, &v))| *y = silu_f32(g) * v),
        }
    });
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = m;
    output(y, &shape)
}

/// `concat([prefix, swiglu(x)], last dim)` in one pass, reading x's rows where they are (the
/// single block's MLP half of its fused projection is a row-strided view): no dense copy of x,
/// no separate activation tensor. `None` where x is not rows of contiguous f32 values or the
/// leading shapes differ (the composition then runs, and reports any shape error).
pub fn swiglu_concat(prefix: &Tensor, x: &Tensor, fast: bool) -> Result<Option<Tensor>> {
    let m = check::swiglu(x)?;
    let rank = x.rank();
    let Some((data, offset, ld)) = strided_rows(x) else { return Ok(None) };
    if prefix.rank() != rank || prefix.shape()[..rank - 1] != x.shape()[..rank - 1] {
        return Ok(None);
    }
    let p = prefix.dim(rank - 1);
    let pv = dense("swiglu_concat", prefix)?;
    let (rows, width) = (x.numel() / (2 * m).max(1), p + m);
    let y = par_filled(rows * width, width, |r, out| {
        let (head, act) = out.split_at_mut(p);
        head.copy_from_slice(&pv[r * p..(r + 1) * p]);
        let (gate, value) = data[offset + r * ld..offset + r * ld + 2 * m].split_at(m);
        let pairs = act.iter_mut().zip(gate.iter().zip(value));
        match fast {
            true => fast_math::vectorised(|| pairs.for_each(|(o, (&g, &v))| *o = fast_math::silu(g) * v)),
            false => pairs.for_each(|(o, (&g, &v))| *o = silu_f32(g) * v),
        }
    });
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = width;
    output(y, &shape).map(Some)
}

/// An f32 tensor as rows of its last axis (`Tensor::row_stride`): its storage, the first row's
/// offset and the row stride; `None` for any other layout or dtype.
fn strided_rows(x: &Tensor) -> Option<(&[f32], usize, usize)> {
    let Some(crate::tensor::CpuStorage::F32(data)) = x.cpu_storage() else { return None };
    Some((&data[..], x.offset(), x.row_stride()?))
}

/// Row-wise op over x `[B, L, C]` with per-sample vectors `[B, C]`: `f(row, out, x, vectors)`
/// is called for every row, with the vectors of that row's sample.
fn per_sample_rows(
    op: &'static str,
    x: &Tensor,
    vecs: &[&Tensor],
    f: impl Fn(usize, &mut [f32], &[f32], &[&[f32]]) + Sync,
) -> Result<Tensor> {
    for v in vecs {
        check::per_sample(op, x, v)?;
    }
    let (l, c) = (x.dim(1), x.dim(2));
    let xv = dense(op, x)?;
    let vv: Vec<_> = vecs.iter().map(|v| dense(op, v)).collect::<Result<_>>()?;
    let y = par_filled(xv.len(), c, |r, y| {
        let x = &xv[r * c..][..c];
        let b = r / l.max(1);
        let rows: Vec<&[f32]> = vv.iter().map(|v| &v[b * c..(b + 1) * c]).collect();
        f(r, y, x, &rows);
    });
    output(y, x.shape())
}

pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    per_sample_rows("modulate", x, &[shift, scale], |_, y, x, v| {
        for i in 0..x.len() {
            y[i] = x[i] * (1.0 + v[1][i]) + v[0][i];
        }
    })
}

pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    check::same_shape("gated_add", x, y)?;
    let yv = dense("gated_add", y)?;
    let c = x.last_dim();
    per_sample_rows("gated_add", x, &[gate], |r, out, x, v| {
        let branch = &yv[r * c..(r + 1) * c];
        for i in 0..c {
            out[i] = x[i] + v[0][i] * branch[i];
        }
    })
}

pub fn channel_affine(x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<Tensor> {
    check::channel_affine(x, mul, add)?;
    let c = x.dim(1);
    let hw = x.dim(2) * x.dim(3);
    let (xv, mv, av) = (dense("channel_affine", x)?, dense("channel_affine", mul)?, dense("channel_affine", add)?);
    let y = par_filled(xv.len(), hw, |i, y| {
        let x = &xv[i * hw..][..hw];
        let ch = i % c;
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = x * mv[ch] + av[ch]);
    });
    output(y, x.shape())
}

pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    check::rank("upsample_nearest2x", x, 4)?;
    let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let xv = dense("upsample_nearest2x", x)?;
    let y = par_filled(b * c * 4 * h * w, 4 * h * w, |i, y| {
        let x = &xv[i * h * w..][..h * w];
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                y[oy * 2 * w + ox] = x[(oy / 2) * w + ox / 2];
            }
        }
    });
    output(y, &[b, c, 2 * h, 2 * w])
}
