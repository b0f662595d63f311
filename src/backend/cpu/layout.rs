//! Concatenation (dense copies of strided blocks).

use super::{dense, output};
use crate::backend::check;
use crate::error::Result;
use crate::tensor::Tensor;

pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let shape = check::concat(xs, dim)?;
    let first = xs[0];
    let outer: usize = first.shape()[..dim].iter().product();
    let inner: usize = first.shape()[dim + 1..].iter().product();
    let total = shape[dim];
    let parts: Vec<_> = xs.iter().map(|x| dense("concat", x)).collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (x, p) in xs.iter().zip(&parts) {
            let block = x.dim(dim) * inner;
            out.extend_from_slice(&p[o * block..(o + 1) * block]);
        }
    }
    output(out, &shape)
}
