//! Concatenation (dense copies of strided blocks).

use super::{dense, output};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::shape("concat", "nothing to concatenate"))?;
    let rank = first.rank();
    if dim >= rank {
        return Err(Error::shape("concat", format!("dim {dim} out of range for {:?}", first.shape())));
    }
    for x in xs {
        let same_other_dims = x.rank() == rank && (0..rank).all(|d| d == dim || x.dim(d) == first.dim(d));
        if !same_other_dims {
            return Err(Error::shape(
                "concat",
                format!("{:?} and {:?} differ outside dim {dim}", first.shape(), x.shape()),
            ));
        }
    }
    let outer: usize = first.shape()[..dim].iter().product();
    let inner: usize = first.shape()[dim + 1..].iter().product();
    let total: usize = xs.iter().map(|x| x.dim(dim)).sum();
    let parts: Vec<_> = xs.iter().map(|x| dense("concat", x)).collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (x, p) in xs.iter().zip(&parts) {
            let block = x.dim(dim) * inner;
            out.extend_from_slice(&p[o * block..(o + 1) * block]);
        }
    }
    let mut shape = first.shape().to_vec();
    shape[dim] = total;
    output(out, &shape)
}
