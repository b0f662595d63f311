//! v4 attention fused on AMX tiles, flash style. For 32 queries at a time,
//! keys go by in blocks of 128: S = Q·Kᵀ for the block (tiles, into a 16 KiB scratch), the online
//! softmax in f32 (running row max and sum, the output rescaled when the max grows; keys past a
//! row's causal or padding limit get probability 0, and key blocks no row sees are skipped), P rounded to
//! bf16 straight into the layout of the tiles' first operand, and O += P·V on tiles, O held as
//! f32 rows. No score matrix, no per-block allocation. K and Vᵀ are the v4 weight panels of the
//! head, packed once (`Panels`: K as n = keys × k = d, Vᵀ as n = d × k = keys).

use std::arch::x86_64::*;

use super::super::fast_math::{exp_nonpositive, exp_nonpositive_x16};
use super::v4_amx::{
    configure_tiles, dot_2x2, load_accumulators, quad, release_tiles, store_accumulators, zero_accumulators, Panels,
    NR, TILE,
};
use super::OutPtr;

/// Queries per task (two 16-row tiles) and keys per softmax block (four 32-key panels).
pub(super) const QB: usize = 32;
const KB: usize = 128;

/// Queries `i0..i0 + rows` (rows ≤ 32) of one head: `q` row r at `q[r * q_stride..][..d]`, the
/// output rows likewise through `out` (row stride `out.ld`). `keys` and `values` are the head's
/// packed K and Vᵀ for `nk` keys; `d` is a multiple of 32. Row r sees the first `visible[r]`
/// keys (a causal or padding mask; ≤ nk); a row that sees none gets zeros, as in the reference.
///
/// # Safety
/// `v4_amx::available()` must be true; `out` must have `rows` rows of `d` values no other task
/// writes.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend(
    q: &[f32],
    q_stride: usize,
    rows: usize,
    keys: &Panels,
    values: &Panels,
    nk: usize,
    visible: &[usize; QB],
    scale: f32,
    out: OutPtr,
) {
    let d = keys.k;
    let dsteps = d / 32;
    debug_assert!(d.is_multiple_of(32) && values.n == d && keys.n == nk && rows <= QB);
    // Q as two row tiles per 32-dim step: [row tile][step] 16 × 16 u32 pairs.
    let mut qt = vec![0u32; 2 * dsteps * TILE];
    for r in 0..rows {
        let row = &q[r * q_stride..r * q_stride + d];
        for s in 0..dsteps {
            let pairs = bf16_pairs(row.as_ptr().add(32 * s));
            _mm512_storeu_si512(qt.as_mut_ptr().add(((r / 16) * dsteps + s) * TILE + (r % 16) * 16) as *mut _, pairs);
        }
    }
    let mut scores = Scratch([0f32; QB * KB]);
    // P as two row tiles per 32-key step of the block: [row tile][step] 16 × 16 u32 pairs.
    let mut p_tiles = vec![0u32; 2 * (KB / 32) * TILE];
    let mut o = vec![0f32; QB * d];
    let (mut max, mut sum) = ([f32::NEG_INFINITY; QB], [0f32; QB]);
    let (k_panel_len, v_panel_len) = (keys.steps * 2 * TILE, values.steps * 2 * TILE);

    let scale_v = _mm512_set1_ps(scale);
    configure_tiles();
    let k_end = visible[..rows].iter().copied().max().unwrap_or(0).min(nk);
    for k0 in (0..k_end).step_by(KB) {
        let live = KB.min(k_end - k0);
        let panels = live.div_ceil(NR);
        // S[32 × live] = Q · Kᵀ, one 32-key panel at a time.
        for kp in 0..panels {
            let b = keys.data.as_ptr().add((k0 / NR + kp) * k_panel_len);
            zero_accumulators();
            for s in 0..dsteps {
                let b0 = b.add(s * 2 * TILE);
                dot_2x2([qt.as_ptr().add(s * TILE), qt.as_ptr().add((dsteps + s) * TILE)], 64, [b0, b0.add(TILE)], 64);
            }
            store_accumulators(quad(scores.0.as_mut_ptr().add(kp * NR), 16, 16 * KB), KB * 4);
        }
        // Online softmax per query row; P into the tiles (keys it does not see: probability 0).
        let lanes = |live: usize, c: usize| -> __mmask16 {
            let n = live.saturating_sub(16 * c).min(16);
            if n == 16 {
                0xffff
            } else {
                (1u16 << n) - 1
            }
        };
        for r in 0..QB {
            let srow = scores.0.as_mut_ptr().add(r * KB);
            let live = visible[r].saturating_sub(k0).min(KB);
            if live == 0 {
                for t in 0..panels {
                    let at = ((r / 16) * (KB / 32) + t) * TILE + (r % 16) * 16;
                    _mm512_storeu_si512(p_tiles.as_mut_ptr().add(at) as *mut _, _mm512_setzero_si512());
                }
                continue;
            }
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in 0..KB / 16 {
                let v = _mm512_mul_ps(_mm512_load_ps(srow.add(16 * c)), scale_v);
                m = _mm512_mask_max_ps(m, lanes(live, c), v, m);
            }
            let new_max = max[r].max(_mm512_reduce_max_ps(m));
            let alpha = exp_nonpositive(max[r] - new_max);
            let (shift, mut acc) = (_mm512_set1_ps(new_max), _mm512_setzero_ps());
            for c in 0..KB / 16 {
                let v = _mm512_fmsub_ps(_mm512_load_ps(srow.add(16 * c)), scale_v, shift);
                let p = _mm512_maskz_mov_ps(lanes(live, c), exp_nonpositive_x16(v));
                _mm512_store_ps(srow.add(16 * c), p);
                acc = _mm512_add_ps(acc, p);
            }
            sum[r] = sum[r] * alpha + _mm512_reduce_add_ps(acc);
            max[r] = new_max;
            if alpha != 1.0 {
                o[r * d..(r + 1) * d].iter_mut().for_each(|v| *v *= alpha);
            }
            for t in 0..panels {
                let at = ((r / 16) * (KB / 32) + t) * TILE + (r % 16) * 16;
                _mm512_storeu_si512(p_tiles.as_mut_ptr().add(at) as *mut _, bf16_pairs(srow.add(32 * t)));
            }
        }
        // O[32 × d] += P · V, one 32-dim panel of Vᵀ at a time.
        for j in 0..d / NR {
            let b = values.data.as_ptr().add(j * v_panel_len);
            let tiles = quad(o.as_mut_ptr().add(j * NR), 16, 16 * d);
            load_accumulators(tiles, d * 4);
            for t in 0..panels {
                let b0 = b.add((k0 / 32 + t) * 2 * TILE);
                let a = [p_tiles.as_ptr().add(t * TILE), p_tiles.as_ptr().add((KB / 32 + t) * TILE)];
                dot_2x2(a, 64, [b0, b0.add(TILE)], 64);
            }
            store_accumulators(tiles, d * 4);
        }
    }
    release_tiles();
    for r in 0..rows {
        // No visible key: o and sum are 0, the output row too (a NaN sum stays NaN through o).
        let inv = if sum[r] > 0.0 { 1.0 / sum[r] } else { 0.0 };
        let dst = std::slice::from_raw_parts_mut(out.ptr.add(r * out.ld), d);
        dst.iter_mut().zip(&o[r * d..(r + 1) * d]).for_each(|(y, &v)| *y = v * inv);
    }
}

#[repr(C, align(64))]
struct Scratch([f32; QB * KB]);

/// 32 f32 at `src` as 16 bf16 pairs (round to nearest even), element 2i in the low half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16_pairs(src: *const f32) -> __m512i {
    let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
    std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
}
