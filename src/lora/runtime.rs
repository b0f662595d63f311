//! The unmerged path: the base weights stay as stored and an adapted linear adds
//! `(x·Aᵀ)·Bᵀ` to its output, with every adapter of that linear in one pair (A stacked, B with the
//! strengths and scales folded in). Two `linear`s and an `axpby`, so every backend runs it, and
//! switching adapters only rebuilds these small pairs.

use super::AdapterSet;
use crate::backend::Backend;
use crate::error::Result;
use crate::tensor::Tensor;

/// One linear's adapters: `A [R, in]`, `B [out, R]` on the device.
pub struct LowRank {
    a: Tensor,
    b: Tensor,
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
        let Some((a, b, r)) = set.low_rank(names, rows) else { return Ok(None) };
        let dtype = be.activation_dtype();
        let a = be.upload(&Tensor::from_f32(a, &[r, cols])?, dtype)?;
        let b = be.upload(&Tensor::from_f32(b, &[rows * names.len(), r])?, dtype)?;
        Ok(Some(LowRank { a, b }))
    }

    /// `y + (x·Aᵀ)·Bᵀ`, `y` being the base linear's output for `x`.
    pub fn apply(&self, be: &dyn Backend, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let h = be.linear(x, &self.a, None)?;
        be.axpby(1.0, y, 1.0, &be.linear(&h, &self.b, None)?)
    }

    pub fn bytes(&self) -> usize {
        [&self.a, &self.b].iter().map(|t| t.numel() * t.dtype().size_in_bytes()).sum()
    }
}
