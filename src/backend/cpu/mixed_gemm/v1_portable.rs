//! v1: widen a block of weight rows to f32, then the `gemm` crate (its own SIMD dispatch, any
//! CPU). The block is the only f32 copy: `(j1 − j0) × k` values per task.

use super::{OutPtr, Weights};
use crate::backend::cpu::gemm::{sgemm, Mat};

pub(super) fn block(m: usize, x: &[f32], w: &Weights, j0: usize, j1: usize, out: OutPtr) {
    let k = w.k;
    let mut panel = vec![0f32; (j1 - j0) * k];
    for (r, row) in panel.chunks_exact_mut(k).enumerate() {
        w.row_f32(j0 + r, 0, row);
    }
    // SAFETY: the output has m rows of `out.ld`; this task writes columns j0..j1 only.
    unsafe {
        sgemm(
            m,
            j1 - j0,
            k,
            out.ptr.add(j0),
            out.ld as isize,
            1,
            Mat { ptr: x.as_ptr(), rs: k as isize, cs: 1 },
            Mat { ptr: panel.as_ptr(), rs: 1, cs: k as isize },
            false,
            1,
        );
    }
}
