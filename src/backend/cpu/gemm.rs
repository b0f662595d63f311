//! Matrix products on the CPU through the `gemm` crate (strided operands, f32 accumulate).

use super::{dense, output};
use crate::backend::check;
use crate::error::Result;
use crate::tensor::Tensor;

/// Operand view: base pointer plus row and column strides in elements.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, all strided. `accumulate` adds into `dst`.
///
/// # Safety
/// Every pointer must be valid for the extents its strides describe, and `dst` must not alias
/// the operands.
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 && m * n * k > 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, k, n) = check::linear(x, w, bias)?;
    let xv = dense("linear", x)?;
    let wv = dense("linear", w)?;
    let mut y = vec![0f32; m * n];
    // y[m×n] = x[m×k] · wᵀ, where wᵀ[kk, nn] = w[nn, kk].
    unsafe {
        sgemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            n as isize,
            1,
            Mat { ptr: xv.as_ptr(), rs: k as isize, cs: 1 },
            Mat { ptr: wv.as_ptr(), rs: 1, cs: k as isize },
            false,
            rayon::current_num_threads(),
        );
    }
    if let Some(b) = bias {
        let bv = dense("linear", b)?;
        for row in y.chunks_exact_mut(n) {
            row.iter_mut().zip(bv.iter()).for_each(|(y, b)| *y += b);
        }
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    output(y, &shape)
}
