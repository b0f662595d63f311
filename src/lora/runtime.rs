//! The unmerged path: the base weights stay as stored and an adapted linear adds
//! `(x·Aᵀ)·Bᵀ` to its output, every LoRA of that linear in one pair (A stacked, B with the
//! strengths and scales folded in), plus `x·Dᵀ` for LoKr/LoHa deltas, which have no low-rank form.
//! Only `linear` and `axpby`, so every backend runs it; switching adapters rebuilds these alone.

use super::AdapterSet;
use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::Tensor;

/// One linear's adapters on the device: `A [R, in]`, `B [out, R]`, and the dense deltas of LoKr
/// and LoHa modules `[out, in]` (as large as the weight: those have no cheaper exact form).
pub struct LowRank {
    pair: Option<(Tensor, Tensor)>,
    dense: Option<Tensor>,
}

impl LowRank {
    /// The pair for the row-wise concatenation of diffusers weights `names` (each `[rows,
    /// cols]`), or None when no adapter touches them.
    pub fn build(
        be: &dyn Backend,
        set: &AdapterSet,
        names: &[&str],
        rows: usize,
        cols: usize,
    ) -> Result<Option<LowRank>> {
        let Some(h) = set.host_adapters(names, rows, cols) else { return Ok(None) };
        let (dtype, out) = (be.activation_dtype(), rows * names.len());
        let pair = if h.rank > 0 {
            let a = be.upload(&Tensor::from_f32(h.a, &[h.rank, cols])?, dtype)?;
            Some((a, be.upload(&Tensor::from_f32(h.b, &[out, h.rank])?, dtype)?))
        } else {
            None
        };
        let dense = h.dense.map(|d| be.upload(&Tensor::from_f32(d, &[out, cols])?, dtype)).transpose()?;
        Ok(Some(LowRank { pair, dense }))
    }

    /// `y + (x·Aᵀ)·Bᵀ + x·Dᵀ`, `y` being the base linear's output for `x`.
    pub fn apply(&self, be: &dyn Backend, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let mut y = y.clone();
        if let Some((a, b)) = &self.pair {
            y = be.axpby(1.0, &y, 1.0, &be.linear(&be.linear(x, a, None)?, b, None)?)?;
        }
        if let Some(d) = &self.dense {
            y = be.axpby(1.0, &y, 1.0, &be.linear(x, d, None)?)?;
        }
        Ok(y)
    }

    pub fn bytes(&self) -> usize {
        let tensors = self.pair.iter().flat_map(|(a, b)| [a, b]).chain(&self.dense);
        tensors.map(|t| t.numel() * t.dtype().size_in_bytes()).sum()
    }
}

/// One linear's adapters on the host: the stacked low-rank pair (A `[R, in]`, B `[out, R]`) and
/// the sum of the dense deltas (LoKr, LoHa: `[out, in]`), strengths and scales folded in.
pub struct HostAdapters {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub dense: Option<Vec<f32>>,
}

impl AdapterSet {
    /// The adapters of the row-wise concatenation of `names` (each `[rows, cols]`), None when no
    /// adapter touches them. LoRA modules give their factors (a module split over several pieces,
    /// as a fused qkv, adds its A once); LoKr and LoHa, which have no low-rank form, their rows.
    pub fn host_adapters(&self, names: &[&str], rows: usize, cols: usize) -> Option<HostAdapters> {
        // (entry, rows of its delta, first row in the concatenation) per piece.
        let mut pieces = Vec::new();
        for (n, name) in names.iter().enumerate() {
            for &(e, p) in self.by_tensor.get(*name).into_iter().flatten() {
                let part = &self.entries[e].parts[p];
                pieces.push((e, part.at..part.at + part.rows.len(), n * rows + part.rows.start));
            }
        }
        if pieces.is_empty() {
            return None;
        }
        let out = rows * names.len();
        let mut a: Vec<f32> = Vec::new();
        let mut first_row_of: Vec<(usize, usize)> = Vec::new(); // (entry, its first row in A)
                                                                // (first column in B, rank, first row in B, scaled rows of up)
        let mut b_blocks: Vec<(usize, usize, usize, Vec<f32>)> = Vec::new();
        let mut dense: Option<Vec<f32>> = None;
        for (e, src, dst) in pieces {
            let entry = &self.entries[e];
            match entry.delta.low_rank() {
                Some((down, up)) => {
                    let start = match first_row_of.iter().find(|(x, _)| *x == e) {
                        Some(&(_, start)) => start,
                        None => {
                            first_row_of.push((e, a.len() / cols));
                            a.extend_from_slice(&down.v);
                            a.len() / cols - down.rows
                        }
                    };
                    let s = entry.strength * entry.delta.scale;
                    let up_rows = up.v[src.start * up.cols..src.end * up.cols].iter().map(|x| x * s).collect();
                    b_blocks.push((start, up.cols, dst, up_rows));
                }
                None => {
                    let d = dense.get_or_insert_with(|| vec![0f32; out * cols]);
                    let delta = entry.delta.rows(src.clone(), entry.strength);
                    for (x, v) in d[dst * cols..(dst + src.len()) * cols].iter_mut().zip(delta) {
                        *x += v;
                    }
                }
            }
        }
        let rank = a.len() / cols;
        let mut b = vec![0f32; out * rank];
        for (start, width, dst, vals) in b_blocks {
            for (k, row) in vals.chunks(width).enumerate() {
                let at = (dst + k) * rank + start;
                b[at..at + width].copy_from_slice(row);
            }
        }
        Some(HostAdapters { rank, a, b, dense })
    }
}
