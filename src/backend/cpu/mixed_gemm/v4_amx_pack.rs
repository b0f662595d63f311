//! v4's weight packing: rows of a stored weight into the tiles' pair-interleaved panels. Whole
//! 32-value steps of 16 rows go through a vector loader (bf16 bits as they are; fp8, int8, int4
//! and GGML Q8_0/Q4_0/Q4_K/Q5_K/Q6_K codes dequantized with `row_f32`'s f32 arithmetic and
//! rounded to bf16) and a 16 × 16 transpose in registers; a ragged tail, a ragged panel and the
//! other encodings (f16 never comes here; the rarer GGML types) go row by row through
//! `Weights::row_f32`, with the same rounding.

use std::arch::x86_64::*;
use std::ops::Range;

use super::v4_amx::{NR, PAIRS, TILE};
use super::weights::{Code, Weights};
use crate::dtype::DType;
use crate::quant::QuantFormat;
use crate::weights::ggml::{self, GgmlType};

/// k values per step (one 64-byte tile row of bf16 pairs).
const STEP: usize = 2 * PAIRS;

/// The encodings with a vector loader.
#[derive(Clone, Copy)]
enum Loader {
    Bf16,
    Fp8,
    Int8,
    ScaledFp8,
    /// Groups a multiple of a step long, so a step has one scale.
    Int4 {
        group: usize,
    },
    Q8_0,
    Q4_0,
    /// The k-quants: a step is one 32-value sub-block of a 256-value block.
    Q4K,
    Q5K,
    Q6K,
}

impl Loader {
    fn of(w: &Weights) -> Option<Loader> {
        Some(match w.code {
            Code::Plain(DType::BF16) => Loader::Bf16,
            Code::Plain(DType::F8E4M3) => Loader::Fp8,
            Code::Quant(QuantFormat::Int8, _) => Loader::Int8,
            Code::Quant(QuantFormat::Fp8, _) => Loader::ScaledFp8,
            Code::Quant(QuantFormat::Int4 { group }, _) if group.is_multiple_of(STEP) => Loader::Int4 { group },
            // One block is one step.
            Code::Quant(QuantFormat::Ggml(GgmlType::Q8_0), _) => Loader::Q8_0,
            Code::Quant(QuantFormat::Ggml(GgmlType::Q4_0), _) => Loader::Q4_0,
            Code::Quant(QuantFormat::Ggml(GgmlType::Q4K), _) => Loader::Q4K,
            Code::Quant(QuantFormat::Ggml(GgmlType::Q5K), _) => Loader::Q5K,
            Code::Quant(QuantFormat::Ggml(GgmlType::Q6K), _) => Loader::Q6K,
            _ => return None,
        })
    }
}

/// Weight rows `n0..n0 + cols`, k-steps `steps`, as a panel of tiles: for each step of 16
/// pairs, the tile of columns 0–15 then that of 16–31, each 16 pairs × 16 columns; entry (p, c)
/// holds elements 2p and 2p+1 of row n0 + c as bf16 (low half the even one). Columns and pairs
/// past the ends are written as zeros: every element of `panel` is written, so the buffer may
/// hold anything before.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_panel(w: &Weights, n0: usize, cols: usize, steps: Range<usize>, panel: &mut [u32]) {
    debug_assert_eq!(panel.len(), steps.len() * 2 * TILE);
    let mut rest = steps.clone();
    if let Some(loader) = Loader::of(w).filter(|_| cols == NR) {
        let whole = (w.k / STEP).clamp(steps.start, steps.end);
        for half in 0..2 {
            for st in steps.start..whole {
                let mut r: [__m512i; 16] = std::array::from_fn(|c| load_step(loader, w, n0 + 16 * half + c, st));
                transpose_16x16(&mut r);
                let tile = panel.as_mut_ptr().add(slot((st - steps.start) * PAIRS, 16 * half));
                for (i, row) in r.iter().enumerate() {
                    _mm512_storeu_si512(tile.add(16 * i) as *mut _, *row);
                }
            }
        }
        rest.start = whole;
    }
    if !rest.is_empty() {
        pack_rows(w, n0, cols, rest.clone(), &mut panel[(rest.start - steps.start) * 2 * TILE..]);
    }
}

/// `pack_panel` one row at a time through `row_f32` (any encoding, any number of columns).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rows(w: &Weights, n0: usize, cols: usize, steps: Range<usize>, panel: &mut [u32]) {
    panel.fill(0);
    let (k0, k1) = ((steps.start * STEP).min(w.k), (steps.end * STEP).min(w.k));
    let (mut row, mut pairs) = (vec![0f32; k1 - k0], vec![0u32; (k1 - k0).div_ceil(2)]);
    for c in 0..cols {
        w.row_f32(n0 + c, k0, &mut row);
        super::v3_avx512bf16::pack_row(&row, &mut pairs);
        for (p, &pair) in pairs.iter().enumerate() {
            panel[slot(p, c)] = pair;
        }
    }
}

/// Row `row`'s values `STEP·st..STEP·(st + 1)` as 16 bf16 pairs; the step must lie inside k.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_step(loader: Loader, w: &Weights, row: usize, st: usize) -> __m512i {
    let base = w.bytes.as_ptr().add(row * w.row_bytes());
    let scale = |i: usize| match w.code {
        Code::Quant(_, s) => s[i],
        Code::Plain(_) => 1.0,
    };
    match loader {
        Loader::Bf16 => _mm512_loadu_si512(base.add(st * 2 * STEP) as *const _),
        Loader::Fp8 => {
            let p = base.add(st * STEP);
            bf16_pairs(fp8_x16(p), fp8_x16(p.add(16)))
        }
        Loader::ScaledFp8 => {
            let (p, s) = (base.add(st * STEP), _mm512_set1_ps(scale(row)));
            bf16_pairs(_mm512_mul_ps(fp8_x16(p), s), _mm512_mul_ps(fp8_x16(p.add(16)), s))
        }
        Loader::Int8 => {
            let (p, s) = (base.add(st * STEP), _mm512_set1_ps(scale(row)));
            bf16_pairs(_mm512_mul_ps(int8_x16(p), s), _mm512_mul_ps(int8_x16(p.add(16)), s))
        }
        Loader::Int4 { group } => {
            // Byte i holds elements 2i (low nibble) and 2i + 1: the pairs themselves.
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(base.add(st * STEP / 2) as *const _));
            let even = _mm512_srai_epi32::<28>(_mm512_slli_epi32::<28>(bytes));
            let odd = _mm512_srai_epi32::<28>(_mm512_slli_epi32::<24>(bytes));
            let s = _mm512_set1_ps(scale(row * (w.k / group) + st * STEP / group));
            let even = bf16_lanes(_mm512_mul_ps(_mm512_cvtepi32_ps(even), s));
            let odd = bf16_lanes(_mm512_mul_ps(_mm512_cvtepi32_ps(odd), s));
            _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
        }
        Loader::Q8_0 => {
            let p = base.add(st * 34);
            let d = _mm512_set1_ps(f16_at(p));
            bf16_pairs(_mm512_mul_ps(d, int8_x16(p.add(2))), _mm512_mul_ps(d, int8_x16(p.add(18))))
        }
        Loader::Q4_0 => {
            // Byte j holds element j (low nibble) and j + 16 (high), both offset by 8.
            let p = base.add(st * 18);
            let d = _mm512_set1_ps(f16_at(p));
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(2) as *const _));
            let eight = _mm512_set1_epi32(8);
            let lo = _mm512_sub_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), eight);
            let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(bytes), eight);
            bf16_pairs(_mm512_mul_ps(d, _mm512_cvtepi32_ps(lo)), _mm512_mul_ps(d, _mm512_cvtepi32_ps(hi)))
        }
        Loader::Q4K | Loader::Q5K => {
            // Sub-block j: d·scale_j·q − dmin·min_j, q the nibbles of 32 bytes (high ones for odd
            // j), Q5_K's fifth bit bit j of each of 32 more bytes.
            let q5 = matches!(loader, Loader::Q5K);
            let (blk, j) = (base.add(st / 8 * if q5 { 176 } else { 144 }), st % 8);
            let (sc, mn) = ggml::scale_min_k4(std::slice::from_raw_parts(blk.add(4), 12));
            let a = _mm512_set1_ps(f16_at(blk) * sc[j] as f32);
            let m = _mm512_set1_ps(f16_at(blk.add(2)) * mn[j] as f32);
            let qs = blk.add(if q5 { 48 } else { 16 } + j / 2 * 32);
            let nibble = _mm512_set1_epi32(0x0F);
            let shift = _mm_cvtsi32_si128(4 * (j % 2) as i32);
            let [lo, hi] = [0, 16].map(|h| {
                let mut q = _mm512_and_si512(_mm512_srl_epi32(u8_x16(qs.add(h)), shift), nibble);
                if q5 {
                    let bit = _mm512_srl_epi32(u8_x16(blk.add(16 + h)), _mm_cvtsi32_si128(j as i32));
                    q = _mm512_or_si512(q, _mm512_slli_epi32::<4>(_mm512_and_si512(bit, _mm512_set1_epi32(1))));
                }
                _mm512_sub_ps(_mm512_mul_ps(a, _mm512_cvtepi32_ps(q)), m)
            });
            bf16_pairs(lo, hi)
        }
        Loader::Q6K => {
            // Sub-block j of half j / 4: 4 low bits from ql, 2 high from qh, minus 32; one scale
            // per 16 values.
            let (blk, j) = (base.add(st / 8 * 210), st % 8);
            let (half, jj) = (j / 4, j % 4);
            let ql = blk.add(half * 64 + 32 * (jj % 2));
            let qh = blk.add(128 + half * 32);
            let d = f16_at(blk.add(208));
            let (low_shift, high_shift) = (_mm_cvtsi32_si128(4 * (jj / 2) as i32), _mm_cvtsi32_si128(2 * jj as i32));
            let [lo, hi] = [0, 16].map(|h| {
                let low = _mm512_and_si512(_mm512_srl_epi32(u8_x16(ql.add(h)), low_shift), _mm512_set1_epi32(0x0F));
                let high = _mm512_and_si512(_mm512_srl_epi32(u8_x16(qh.add(h)), high_shift), _mm512_set1_epi32(3));
                let q = _mm512_sub_epi32(_mm512_or_si512(low, _mm512_slli_epi32::<4>(high)), _mm512_set1_epi32(32));
                let scale = *blk.add(192 + 2 * j + h / 16) as i8 as f32;
                _mm512_mul_ps(_mm512_set1_ps(d * scale), _mm512_cvtepi32_ps(q))
            });
            bf16_pairs(lo, hi)
        }
    }
}

/// 16 unsigned bytes as 32-bit lanes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn u8_x16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const _))
}

/// 32 consecutive values (`lo` the first 16) as 16 bf16 pairs, rounded to nearest even.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16_pairs(lo: __m512, hi: __m512) -> __m512i {
    std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
}

/// 16 f32 rounded to bf16 (nearest even), each in the low half of a 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16_lanes(x: __m512) -> __m512i {
    _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)))
}

/// 16 signed bytes as f32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn int8_x16(p: *const u8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const _)))
}

/// 16 fp8 e4m3 bytes as f32 (exact): the 7 magnitude bits placed under f32's exponent field,
/// scaled by 2^(127 − 7) (which also gets the subnormals right), the sign put back, and the
/// one NaN code (S.1111.111) kept NaN.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fp8_x16(p: *const u8) -> __m512 {
    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const _));
    let magnitude = _mm512_and_si512(v, _mm512_set1_epi32(0x7F));
    let two_120 = _mm512_set1_ps(f32::from_bits((127 + 120) << 23));
    let value = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<20>(magnitude)), two_120);
    let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(v, _mm512_set1_epi32(0x80)));
    let value = _mm512_or_ps(value, _mm512_castsi512_ps(sign));
    let nan = _mm512_cmpeq_epi32_mask(magnitude, _mm512_set1_epi32(0x7F));
    _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(f32::NAN))
}

/// The little-endian f16 at `p`, as f32.
#[inline]
unsafe fn f16_at(p: *const u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
}
/// A 16 × 16 matrix of 32-bit values (one row per register) transposed in place: interleaves of
/// 32-bit then 64-bit elements within 128-bit lanes, then two rounds of lane shuffles.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(r: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4i + j], lane L: column 4L + j of rows 4i..4i + 4.
    for i in 0..4 {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for j in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(r[j], r[4 + j]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(r[j], r[4 + j]);
        let w0 = _mm512_shuffle_i32x4::<0x44>(r[8 + j], r[12 + j]);
        let w1 = _mm512_shuffle_i32x4::<0xEE>(r[8 + j], r[12 + j]);
        t[j] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        t[4 + j] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
        t[8 + j] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        t[12 + j] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
    }
    *r = t;
}

/// Where pair `p` of panel column `c` lives in the tile-by-tile panel.
#[inline]
pub(super) fn slot(p: usize, c: usize) -> usize {
    ((p / PAIRS) * 2 + c / 16) * TILE + (p % PAIRS) * 16 + c % 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize, Quantized};
    use crate::weights::ggml::synthetic_blocks;

    /// The vector loaders give the row path's bits exactly (same f32 arithmetic, same rounding),
    /// for every encoding that has one, including fp8's subnormals, signs and NaN code.
    #[test]
    fn vector_loaders_match_the_row_path_bit_for_bit() {
        if !super::super::v4_amx::available() {
            eprintln!("no AVX-512 BF16 / AMX here: nothing to compare");
            return;
        }
        let (n, k) = (NR, 16 * STEP);
        let values = crate::rng::normal_vec(11, "pack", n * k);
        let all_fp8: Vec<u8> = (0..n * k).map(|i| (i * 37 % 256) as u8).collect();
        let bf16 = crate::dtype::encode_from_f32(&values, DType::BF16);
        let mut cases: Vec<(Vec<u8>, Option<Quantized>, DType)> =
            vec![(bf16, None, DType::BF16), (all_fp8.clone(), None, DType::F8E4M3)];
        for format in [QuantFormat::Int8, QuantFormat::Int4 { group: 64 }, QuantFormat::Fp8] {
            let mut q = quantize(&values, n, k, format).unwrap();
            if format == QuantFormat::Fp8 {
                q.codes = all_fp8.clone();
            }
            cases.push((Vec::new(), Some(q), DType::U8));
        }
        for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let codes = synthetic_blocks(t, n * k, 3);
            cases.push((
                Vec::new(),
                Some(Quantized { format: QuantFormat::Ggml(t), rows: n, cols: k, codes, scales: vec![] }),
                DType::U8,
            ));
        }
        for (bytes, q, dtype) in &cases {
            let w = match q {
                Some(q) => Weights { bytes: &q.codes, code: Code::Quant(q.format, &q.scales), n, k },
                None => Weights::plain(bytes, *dtype, n, k),
            };
            assert!(Loader::of(&w).is_some(), "{:?}", w.code);
            let (mut fast, mut rows) = (vec![1u32; 16 * 2 * TILE], vec![2u32; 16 * 2 * TILE]);
            // SAFETY: available() saw AMX, hence AVX-512 BF16.
            unsafe {
                pack_panel(&w, 0, NR, 0..16, &mut fast);
                pack_rows(&w, 0, NR, 0..16, &mut rows);
            }
            assert_eq!(fast, rows, "{:?}", w.code);
        }
    }
}
