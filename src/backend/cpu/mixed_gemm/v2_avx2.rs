//! v2: AVX2 + FMA micro-kernel, 6 rows × 16 columns of f32 accumulators (12 ymm). Weights are
//! widened to f32 in the packing (a `k × 16` panel per 16 columns, exact for bf16/f16/fp8);
//! activations are read in place.

use std::arch::x86_64::*;

use super::{OutPtr, Weights};

pub(super) const NR: usize = 16;
const MR: usize = 6;

/// Columns `j0..j1` of `y = x · wᵀ`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `out` must have m rows of `out.ld` ≥ `w.n` values, with no other writer of these columns.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block(m: usize, x: &[f32], w: &Weights, j0: usize, j1: usize, out: OutPtr) {
    let k = w.k;
    let panels = (j1 - j0).div_ceil(NR);
    let mut packed = vec![0f32; panels * k * NR];
    let mut row = vec![0f32; k];
    for p in 0..panels {
        let panel = &mut packed[p * k * NR..(p + 1) * k * NR];
        for c in 0..NR.min(j1 - j0 - p * NR) {
            w.row_f32(j0 + p * NR + c, 0, &mut row);
            for (kk, v) in row.iter().enumerate() {
                panel[kk * NR + c] = *v;
            }
        }
    }
    let mut tile = [0f32; MR * NR];
    for i0 in (0..m).step_by(MR) {
        // Rows past the end repeat the last row; their results are not stored.
        let rows: [*const f32; MR] = std::array::from_fn(|r| x.as_ptr().add((i0 + r).min(m - 1) * k));
        for p in 0..panels {
            kernel(k, &rows, packed.as_ptr().add(p * k * NR), &mut tile);
            let (c0, cols) = (j0 + p * NR, NR.min(j1 - j0 - p * NR));
            for r in 0..MR.min(m - i0) {
                let dst = out.ptr.add((i0 + r) * out.ld + c0);
                std::ptr::copy_nonoverlapping(tile.as_ptr().add(r * NR), dst, cols);
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(k: usize, rows: &[*const f32; MR], panel: *const f32, tile: &mut [f32; MR * NR]) {
    let mut acc = [_mm256_setzero_ps(); 2 * MR];
    for kk in 0..k {
        let b0 = _mm256_loadu_ps(panel.add(kk * NR));
        let b1 = _mm256_loadu_ps(panel.add(kk * NR + 8));
        for r in 0..MR {
            let a = _mm256_broadcast_ss(&*rows[r].add(kk));
            acc[2 * r] = _mm256_fmadd_ps(a, b0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(a, b1, acc[2 * r + 1]);
        }
    }
    for r in 0..MR {
        _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR), acc[2 * r]);
        _mm256_storeu_ps(tile.as_mut_ptr().add(r * NR + 8), acc[2 * r + 1]);
    }
}
