//! v3: AVX-512 BF16 micro-kernel (`vdpbf16ps`: 16 lanes × a pair of bf16 products per
//! instruction), 12 rows × 32 columns of f32 accumulators (24 zmm). Activations are rounded to
//! bf16 once per GEMM (round to nearest even, as torch's bf16 linears see them) and stored as
//! k-pairs; the bf16 weights are repacked into `k/2 × 32` panels of pairs, bits unchanged.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{OutPtr, Weights};

pub(super) const NR: usize = 32;
const MR: usize = 12;

/// `x[m×k]` as bf16 pairs: row-major `m × ⌈k/2⌉` u32 (low half the even element; an odd k's last
/// pair has a zero high half).
pub(super) fn pack_activations(m: usize, k: usize, x: &[f32]) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut xb = vec![0u32; m * kp];
    xb.par_chunks_mut(kp.max(1)).zip(x.par_chunks(k.max(1))).for_each(|(dst, src)| {
        // SAFETY: matmul only picks this path when available() saw AVX-512 F/BW/BF16.
        unsafe { pack_row(src, dst) }
    });
    xb
}

/// One row of `x` as bf16 pairs (`dst` may be longer: the rest is left as it is).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_row(src: &[f32], dst: &mut [u32]) {
    let whole = src.len() / 32;
    for c in 0..whole {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * c));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * c + 16));
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(16 * c) as *mut _, packed);
    }
    for (i, pair) in src[32 * whole..].chunks(2).enumerate() {
        let lo = half::bf16::from_f32(pair[0]).to_bits() as u32;
        let hi = pair.get(1).map_or(0, |v| half::bf16::from_f32(*v).to_bits() as u32);
        dst[16 * whole + i] = lo | hi << 16;
    }
}

/// Columns `j0..j1` of `y = x · wᵀ` (w bf16).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/BF16; `xb` from `pack_activations(m, w.k, ..)`; `out` must have
/// m rows of `out.ld` ≥ `w.n` values, with no other writer of these columns.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn block(m: usize, xb: &[u32], w: &Weights, j0: usize, j1: usize, out: OutPtr) {
    let k = w.k;
    let kp = k.div_ceil(2);
    let panels = (j1 - j0).div_ceil(NR);
    let mut packed = vec![0u32; panels * kp * NR];
    for p in 0..panels {
        let panel = &mut packed[p * kp * NR..(p + 1) * kp * NR];
        for c in 0..NR.min(j1 - j0 - p * NR) {
            let row = &w.bytes[(j0 + p * NR + c) * k * 2..(j0 + p * NR + c + 1) * k * 2];
            for (pp, pair) in row.chunks(4).enumerate() {
                let hi = if pair.len() == 4 { u16::from_le_bytes([pair[2], pair[3]]) as u32 } else { 0 };
                panel[pp * NR + c] = u16::from_le_bytes([pair[0], pair[1]]) as u32 | hi << 16;
            }
        }
    }
    let mut tile = [0f32; MR * NR];
    for i0 in (0..m).step_by(MR) {
        // Rows past the end repeat the last row; their results are not stored.
        let rows: [*const u32; MR] = std::array::from_fn(|r| xb.as_ptr().add((i0 + r).min(m - 1) * kp));
        for p in 0..panels {
            kernel(kp, &rows, packed.as_ptr().add(p * kp * NR), &mut tile);
            let (c0, cols) = (j0 + p * NR, NR.min(j1 - j0 - p * NR));
            for r in 0..MR.min(m - i0) {
                let dst = out.ptr.add((i0 + r) * out.ld + c0);
                std::ptr::copy_nonoverlapping(tile.as_ptr().add(r * NR), dst, cols);
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel(kp: usize, rows: &[*const u32; MR], panel: *const u32, tile: &mut [f32; MR * NR]) {
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16) as *const _));
        for r in 0..MR {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rows[r].add(p) as i32));
            acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], a, b0);
            acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], a, b1);
        }
    }
    for r in 0..MR {
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), acc[2 * r]);
        _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), acc[2 * r + 1]);
    }
}
