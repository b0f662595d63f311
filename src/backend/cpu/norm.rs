//! Normalisations with f64 statistics (the reference should be more accurate than any kernel).

use super::{dense, fast_math, output, par_filled};
use crate::backend::check;
use crate::error::Result;
use crate::tensor::Tensor;

/// Mean and variance in f64, summed in 8 lanes (so the loop vectorises; the order differs from a
/// serial sum only far below f32's precision).
#[inline(always)]
fn mean_var(row: &[f32]) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = lane_sum(row, |x| x as f64) / n;
    let var = lane_sum(row, |x| (x as f64 - mean).powi(2)) / n;
    (mean, var)
}

/// Σ f(x) in 8 f64 lanes, so the loop vectorises (the order differs from a serial sum only far
/// below f32's precision).
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, &x)| *l += f(x));
    }
    lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f64>()
}

pub fn layer_norm(x: &Tensor, eps: f32) -> Result<Tensor> {
    let c = x.last_dim();
    let xv = dense("layer_norm", x)?;
    let y = par_filled(xv.len(), c, |i, y| {
        let x = &xv[i * c..][..c];
        let (mean, var) = mean_var(x);
        let inv = 1.0 / (var + eps as f64).sqrt();
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = ((x as f64 - mean) * inv) as f32);
    });
    output(y, x.shape())
}

pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    check::rms_weight(x, weight)?;
    let c = x.last_dim();
    let xv = dense("rms_norm", x)?;
    let wv = weight.map(|w| dense("rms_norm", w)).transpose()?;
    let y = par_filled(xv.len(), c, |i, y| {
        let x = &xv[i * c..][..c];
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        match &wv {
            Some(w) => y.iter_mut().zip(x).zip(w.iter()).for_each(|((y, &x), &w)| *y = (x as f64 * inv) as f32 * w),
            None => y.iter_mut().zip(x).for_each(|(y, &x)| *y = (x as f64 * inv) as f32),
        }
    });
    output(y, x.shape())
}

/// GroupNorm over `[B, C, H, W]`, then SiLU if `silu`. `fast` (the bf16 precision path)
/// normalises in f32 with the polynomial SiLU, 16 lanes wide; the statistics are f64 either way.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    silu: bool,
    fast: bool,
) -> Result<Tensor> {
    check::group_norm(x, groups, weight, bias)?;
    let c = x.dim(1);
    let hw = x.dim(2) * x.dim(3);
    let xv = dense("group_norm", x)?;
    let (wv, bv) = (dense("group_norm", weight)?, dense("group_norm", bias)?);
    let per_group = c / groups * hw;
    let y = par_filled(xv.len(), per_group, |gi, y| {
        let x = &xv[gi * per_group..][..per_group];
        let (mean, var) = fast_math::vectorised(|| mean_var(x));
        let inv = 1.0 / (var + eps as f64).sqrt();
        let first_channel = (gi % groups) * (c / groups);
        for (ci, (y, x)) in y.chunks_mut(hw.max(1)).zip(x.chunks(hw.max(1))).enumerate() {
            let (w, bb) = (wv[first_channel + ci], bv[first_channel + ci]);
            if fast {
                // y = x·a + b' with the normalisation folded into one multiply-add.
                let a = (inv as f32) * w;
                let b = bb - (mean * inv) as f32 * w;
                fast_math::vectorised(|| match silu {
                    true => y.iter_mut().zip(x).for_each(|(y, &x)| *y = fast_math::silu(x * a + b)),
                    false => y.iter_mut().zip(x).for_each(|(y, &x)| *y = x * a + b),
                });
                continue;
            }
            for (y, &x) in y.iter_mut().zip(x) {
                let v = ((x as f64 - mean) * inv) as f32 * w + bb;
                *y = if silu { v / (1.0 + (-v).exp()) } else { v };
            }
        }
    });
    output(y, x.shape())
}
