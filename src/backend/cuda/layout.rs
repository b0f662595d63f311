//! Dense copies of strided views and concatenation (one strided-copy kernel, up to 6 dims).

use cudarc::driver::DeviceRepr;

use super::{grid_1d, launch, CudaBackend};
use crate::backend::check;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Matches `struct Strided6` in kernels/elementwise.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Strided6 {
    size: [i64; 6],
    src: [i64; 6],
    dst: [i64; 6],
}

unsafe impl DeviceRepr for Strided6 {}

/// Copy the elements of view `src` into view `dst` (same shape).
pub(super) fn copy_into(be: &CudaBackend, dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() || dst.dtype() != src.dtype() {
        return Err(Error::shape(
            "copy",
            format!("{:?} {} into {:?} {}", src.shape(), src.dtype(), dst.shape(), dst.dtype()),
        ));
    }
    let rank = src.rank();
    if rank > 6 {
        return Err(Error::shape("copy", format!("rank {rank} views are not supported on the GPU (max 6)")));
    }
    let n = src.numel();
    if n == 0 {
        return Ok(());
    }
    let mut s = Strided6 { size: [1; 6], src: [0; 6], dst: [0; 6] };
    for d in 0..rank {
        let k = 6 - rank + d;
        s.size[k] = src.dim(d) as i64;
        s.src[k] = src.strides()[d] as i64;
        s.dst[k] = dst.strides()[d] as i64;
    }
    let (dp, sp) = (be.ptr(dst)?, be.ptr(src)?);
    let kernel = match src.dtype().size_in_bytes() {
        2 => "strided_copy_b16",
        4 => "strided_copy_b32",
        b => return Err(Error::shape("copy", format!("{b}-byte elements are not supported"))),
    };
    launch!(be.dev, kernel, grid_1d(n), dp, sp, s, n as i64)
}

pub(super) fn contiguous(be: &CudaBackend, x: &Tensor) -> Result<Tensor> {
    let out = be.output(x.dtype(), x.shape())?;
    copy_into(be, &out, x)?;
    Ok(out)
}

pub(super) fn concat(be: &CudaBackend, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let shape = check::concat(xs, dim)?;
    let first = xs[0];
    let out = be.output(first.dtype(), &shape)?;
    let mut at = 0;
    for x in xs {
        copy_into(be, &out.narrow(dim, at, x.dim(dim))?, x)?;
        at += x.dim(dim);
    }
    Ok(out)
}
