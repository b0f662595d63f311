//! Dense copies of strided views and concatenation (strided-copy kernels, up to 6 dims after merging).

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

/// One dim of a copy: size, source stride, destination stride (elements or 16-byte units).
type CopyDim = (i64, i64, i64);

/// The copy's dims with size-1 dims dropped and each dim merged into the next inner one where
/// both sides are contiguous across them (a concat or a narrow becomes one or two dims).
fn merged_dims(dst: &Tensor, src: &Tensor) -> Vec<CopyDim> {
    let mut dims: Vec<CopyDim> = Vec::new();
    for d in (0..src.rank()).rev() {
        let (n, s, t) = (src.dim(d) as i64, src.strides()[d] as i64, dst.strides()[d] as i64);
        if n == 1 {
            continue;
        }
        match dims.last_mut() {
            Some((n0, s0, t0)) if s == *s0 * *n0 && t == *t0 * *n0 => *n0 *= n,
            _ => dims.push((n, s, t)),
        }
    }
    dims.reverse();
    dims
}

/// The dims in 16-byte units when the innermost dim is contiguous on both sides and everything is
/// a whole number of units (strided_copy_x16); None otherwise.
fn in_units(dims: &[CopyDim], elem: i64, dp: u64, sp: u64) -> Option<Vec<CopyDim>> {
    let &(n, s, t) = dims.last()?;
    let per = 16 / elem;
    if s != 1 || t != 1 || n % per != 0 || !dp.is_multiple_of(16) || !sp.is_multiple_of(16) {
        return None;
    }
    let inner = dims[..dims.len() - 1].iter().all(|&(_, s, t)| s % per == 0 && t % per == 0);
    let fits = dims.iter().all(|&(n, ..)| n / per <= i32::MAX as i64);
    let last = dims.len() - 1;
    (inner && fits).then(|| {
        dims.iter()
            .enumerate()
            .map(|(i, &(n, s, t))| if i == last { (n / per, 1, 1) } else { (n, s / per, t / per) })
            .collect()
    })
}

/// Copy the elements of view `src` into view `dst` (same shape): v2 (`strided_copy_x16`) when
/// the merged innermost dim is contiguous and 16-byte aligned, else v1 (one element per thread).
pub(super) fn copy_into(be: &CudaBackend, dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() || dst.dtype() != src.dtype() {
        return Err(Error::shape(
            "copy",
            format!("{:?} {} into {:?} {}", src.shape(), src.dtype(), dst.shape(), dst.dtype()),
        ));
    }
    let n = src.numel();
    if n == 0 {
        return Ok(());
    }
    let elem = src.dtype().size_in_bytes();
    let dims = merged_dims(dst, src);
    if dims.len() > 6 {
        return Err(Error::shape(
            "copy",
            format!("views of {} non-mergeable dims exceed the GPU copy's 6", dims.len()),
        ));
    }
    let (dp, sp) = (be.ptr(dst)?, be.ptr(src)?);
    let pack = |dims: &[CopyDim]| {
        let mut s = Strided6 { size: [1; 6], src: [0; 6], dst: [0; 6] };
        for (k, &(n, a, b)) in (6 - dims.len()..).zip(dims) {
            (s.size[k], s.src[k], s.dst[k]) = (n, a, b);
        }
        s
    };
    if let Some(units) = in_units(&dims, elem as i64, dp, sp) {
        let count = n * elem / 16;
        return launch!(be.dev, "strided_copy_x16", grid_1d(count), dp, sp, pack(&units), count as i64);
    }
    let kernel = match elem {
        2 => "strided_copy_b16",
        4 => "strided_copy_b32",
        b => return Err(Error::shape("copy", format!("{b}-byte elements are not supported"))),
    };
    launch!(be.dev, kernel, grid_1d(n), dp, sp, pack(&dims), n as i64)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::from_f32(vec![0.0; shape.iter().product()], shape).unwrap()
    }

    #[test]
    fn contiguous_dims_merge() {
        // Dense into dense: one dim.
        let (a, b) = (t(&[2, 3, 4]), t(&[2, 3, 4]));
        assert_eq!(merged_dims(&a, &b), vec![(24, 1, 1)]);
        // A narrow of the last dim into a dense tensor: rows stay apart on the source side.
        let src = t(&[2, 5, 48]).narrow(2, 16, 24).unwrap();
        assert_eq!(merged_dims(&t(&[2, 5, 24]), &src), vec![(10, 48, 24), (24, 1, 1)]);
        // Into a concat's slice on dim 1: the destination merges dims 1 and 2, the source too.
        let out = t(&[2, 8, 8]).narrow(1, 3, 5).unwrap();
        assert_eq!(merged_dims(&out, &t(&[2, 5, 8])), vec![(2, 40, 64), (40, 1, 1)]);
        // A permutation keeps its dims; size-1 dims drop out.
        let p = t(&[1, 3, 5]).permute(&[2, 0, 1]).unwrap();
        assert_eq!(merged_dims(&t(&[5, 1, 3]), &p), vec![(5, 1, 3), (3, 5, 1)]);
    }

    #[test]
    fn sixteen_byte_units_need_a_contiguous_aligned_inner_dim() {
        assert_eq!(in_units(&[(10, 48, 24), (24, 1, 1)], 2, 0, 32), Some(vec![(10, 6, 3), (3, 1, 1)]));
        assert_eq!(in_units(&[(10, 48, 24), (24, 1, 1)], 2, 0, 34), None); // source 2 bytes off
        assert_eq!(in_units(&[(4, 6, 6), (6, 1, 1)], 2, 0, 0), None); // 12-byte rows
        assert_eq!(in_units(&[(5, 1, 3), (3, 5, 1)], 2, 0, 0), None); // inner dim strided
        assert_eq!(in_units(&[(8, 1, 1)], 4, 0, 0), Some(vec![(2, 1, 1)]));
    }
}
