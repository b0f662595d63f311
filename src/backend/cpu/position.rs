//! Rotary position embedding, timestep embedding and token embedding lookup.

use super::{dense, output, par_filled};
use crate::backend::check;
use crate::error::Result;
use crate::tensor::Tensor;

#[derive(Clone, Copy)]
pub enum RopeLayout {
    /// Pairs (x[2m], x[2m+1]): FLUX.
    Interleaved,
    /// Pairs (x[m], x[m + D/2]): Qwen (rotate-half).
    Half,
}

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    let op = match layout {
        RopeLayout::Interleaved => "rope_interleaved",
        RopeLayout::Half => "rope_half",
    };
    check::rope(op, x, cos, sin)?;
    let (n, h, d) = (x.dim(1), x.dim(2), x.dim(3));
    let half = d / 2;
    let xv = dense(op, x)?;
    let (cv, sv) = (dense(op, cos)?, dense(op, sin)?);
    let y = par_filled(xv.len(), d, |row, y| {
        let x = &xv[row * d..][..d];
        let token = (row / h) % n;
        let (c, s) = (&cv[token * half..(token + 1) * half], &sv[token * half..(token + 1) * half]);
        for m in 0..half {
            let (i0, i1) = match layout {
                RopeLayout::Interleaved => (2 * m, 2 * m + 1),
                RopeLayout::Half => (m, m + half),
            };
            let (a, b) = (x[i0], x[i1]);
            y[i0] = a * c[m] - b * s[m];
            y[i1] = b * c[m] + a * s[m];
        }
    });
    output(y, x.shape())
}

/// Same f32 arithmetic as diffusers' `get_timestep_embedding` (exponent, exp, product in f32).
pub fn timestep_embedding(t: &[f32], dim: usize, max_period: f32) -> Result<Tensor> {
    let half = dim / 2;
    let neg_log = -(max_period as f64).ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|j| (neg_log * j as f32 / half as f32).exp()).collect();
    let mut out = vec![0f32; t.len() * dim];
    for (row, &ti) in out.chunks_exact_mut(dim).zip(t) {
        for j in 0..half {
            let arg = ti * freqs[j];
            row[j] = arg.cos();
            row[half + j] = arg.sin();
        }
    }
    output(out, &[t.len(), dim])
}

pub fn embedding(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    check::embedding(ids, table)?;
    let c = table.dim(1);
    if !matches!(table.cpu_storage(), Some(crate::tensor::CpuStorage::F32(_))) {
        // A table kept in its stored dtype (a 150k-token vocabulary): widen only the rows used.
        let mut out = Vec::with_capacity(ids.len() * c);
        for &i in ids {
            out.extend(table.narrow(0, i as usize, 1)?.to_vec_f32()?);
        }
        return output(out, &[ids.len(), c]);
    }
    let tv = dense("embedding", table)?;
    let mut out = Vec::with_capacity(ids.len() * c);
    for &i in ids {
        out.extend_from_slice(&tv[i as usize * c..(i as usize + 1) * c]);
    }
    output(out, &[ids.len(), c])
}
