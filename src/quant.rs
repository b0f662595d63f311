//! Weight-only quantization formats (what `--text-encoder-precision` selects): the exact math the
//! GPU kernels dequantize with, and the CPU reference of it. Symmetric, round to nearest even.
//!   int8: one f32 scale per output row, codes in [-127, 127];
//!   int4: one f32 scale per row and group of input columns (the clipping of the group's |w|max
//!         with the least squared error), codes in [-8, 7], two per byte (low nibble first);
//!   fp8:  one f32 scale per output row, e4m3 codes (|w|max maps to 448).

use rayon::prelude::*;

use crate::dtype::{f32_to_f8e4m3, f8e4m3_to_f32, F8E4M3_MAX};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    Int8,
    Int4 { group: usize },
    Fp8,
}

impl QuantFormat {
    /// Kernel format id (kernels/gemm.cu).
    pub fn id(self) -> i32 {
        match self {
            QuantFormat::Int8 => 0,
            QuantFormat::Int4 { .. } => 1,
            QuantFormat::Fp8 => 2,
        }
    }

    pub fn group(self) -> usize {
        match self {
            QuantFormat::Int4 { group } => group,
            _ => 0,
        }
    }

    /// The group actually used for `cols` input columns: the requested one when it divides
    /// `cols`, else the largest even divisor of `cols` below it (tiny test models).
    pub fn for_cols(self, cols: usize) -> Result<QuantFormat> {
        match self {
            QuantFormat::Int4 { group } => {
                if cols % 2 != 0 {
                    return Err(Error::shape("int4", format!("{cols} input columns cannot pack two codes per byte")));
                }
                let g = (2..=group.min(cols)).rev().find(|g| g % 2 == 0 && cols % g == 0).unwrap_or(2);
                Ok(QuantFormat::Int4 { group: g })
            }
            f => Ok(f),
        }
    }

    pub fn code_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            QuantFormat::Int4 { .. } => rows * cols / 2,
            _ => rows * cols,
        }
    }

    pub fn scale_count(self, rows: usize, cols: usize) -> usize {
        match self {
            QuantFormat::Int4 { group } => rows * cols / group,
            _ => rows,
        }
    }
}

/// Quantized codes and scales of a row-major `[rows, cols]` weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
}

fn absmax(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// The int4 scale of one group: the clipping of |w|max (to 100%, 95%, ... 60%) with the least
/// squared error. Clipping a rare large weight keeps the other 63 on a finer grid.
fn int4_scale(chunk: &[f32]) -> f32 {
    let top = absmax(chunk);
    if top == 0.0 {
        return 0.0;
    }
    let error =
        |s: f32| -> f32 { chunk.iter().map(|&x| (x - (x / s).round_ties_even().clamp(-8.0, 7.0) * s).powi(2)).sum() };
    (0..9)
        .map(|i| top * (1.0 - 0.05 * i as f32) / 7.0)
        .map(|s| (error(s), s))
        .fold((f32::INFINITY, top / 7.0), |best, c| if c.0 < best.0 { c } else { best })
        .1
}

pub fn quantize(w: &[f32], rows: usize, cols: usize, format: QuantFormat) -> Result<Quantized> {
    if w.len() != rows * cols {
        return Err(Error::shape("quantize", format!("{} values for [{rows}, {cols}]", w.len())));
    }
    let format = format.for_cols(cols)?;
    let mut codes = vec![0u8; format.code_bytes(rows, cols)];
    let mut scales = vec![0f32; format.scale_count(rows, cols)];
    match format {
        QuantFormat::Int8 | QuantFormat::Fp8 => {
            let top = if format == QuantFormat::Int8 { 127.0 } else { F8E4M3_MAX };
            codes.par_chunks_mut(cols).zip(scales.par_iter_mut()).zip(w.par_chunks(cols)).for_each(
                |((codes, scale), row)| {
                    let s = absmax(row) / top;
                    *scale = s;
                    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                    for (code, &x) in codes.iter_mut().zip(row) {
                        *code = match format {
                            QuantFormat::Int8 => (x * inv).round_ties_even().clamp(-127.0, 127.0) as i8 as u8,
                            _ => f32_to_f8e4m3(x * inv),
                        };
                    }
                },
            );
        }
        QuantFormat::Int4 { group } => {
            let groups = cols / group;
            // Rows are independent: quantize them in parallel.
            let row_bytes = cols / 2;
            codes.par_chunks_mut(row_bytes).zip(scales.par_chunks_mut(groups)).enumerate().for_each(
                |(r, (codes, scales))| {
                    for g in 0..groups {
                        let chunk = &w[r * cols + g * group..r * cols + (g + 1) * group];
                        let s = int4_scale(chunk);
                        scales[g] = s;
                        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                        for (i, &x) in chunk.iter().enumerate() {
                            let q = ((x * inv).round_ties_even().clamp(-8.0, 7.0) as i8 as u8) & 0x0F;
                            let k = g * group + i;
                            codes[k / 2] |= if k % 2 == 0 { q } else { q << 4 };
                        }
                    }
                },
            );
        }
    }
    Ok(Quantized { format, rows, cols, codes, scales })
}

/// Element `(r, c)` of the dequantized weight (the kernels' arithmetic: code · scale in f32).
#[inline]
pub fn dequant_at(q: &Quantized, r: usize, c: usize) -> f32 {
    match q.format {
        QuantFormat::Int8 => q.codes[r * q.cols + c] as i8 as f32 * q.scales[r],
        QuantFormat::Fp8 => f8e4m3_to_f32(q.codes[r * q.cols + c]) * q.scales[r],
        QuantFormat::Int4 { group } => {
            let byte = q.codes[(r * q.cols + c) / 2];
            let nib = if c % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            let v = if nib >= 8 { nib as i32 - 16 } else { nib as i32 };
            v as f32 * q.scales[r * (q.cols / group) + c / group]
        }
    }
}

pub fn dequantize(q: &Quantized) -> Vec<f32> {
    (0..q.rows).flat_map(|r| (0..q.cols).map(move |c| (r, c))).map(|(r, c)| dequant_at(q, r, c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        crate::rng::normal_vec(3, "w", rows * cols)
    }

    #[test]
    fn roundtrip_errors_are_within_half_a_step() {
        let (rows, cols) = (5, 128);
        let w = weights(rows, cols);
        for fmt in [QuantFormat::Int8, QuantFormat::Int4 { group: 64 }, QuantFormat::Fp8] {
            let q = quantize(&w, rows, cols, fmt).unwrap();
            let d = dequantize(&q);
            for r in 0..rows {
                for c in 0..cols {
                    let (x, y) = (w[r * cols + c], d[r * cols + c]);
                    let bound = match fmt {
                        QuantFormat::Int8 => q.scales[r] * 0.5,
                        QuantFormat::Int4 { group } => {
                            // Half a step, unless the group's clipping cut this weight.
                            let s = q.scales[r * (cols / group) + c / group];
                            (s * 0.5).max(x.abs() - 7.0 * s)
                        }
                        QuantFormat::Fp8 => x.abs() / 16.0 + q.scales[r] * 2f32.powi(-10),
                    };
                    assert!((x - y).abs() <= bound * 1.0001 + 1e-7, "{fmt:?} ({r},{c}): {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn int4_clipping_beats_absmax_on_heavy_tails() {
        // 63 ordinary weights and one spike: clipping the spike lowers the group's squared error.
        let mut w: Vec<f32> = crate::rng::normal_vec(5, "g", 64);
        w[10] = 12.0;
        let q = quantize(&w, 1, 64, QuantFormat::Int4 { group: 64 }).unwrap();
        assert!(q.scales[0] < 12.0 / 7.0);
        let err = |d: &[f32]| w.iter().zip(d).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
        let plain: Vec<f32> =
            w.iter().map(|x| (x / (12.0 / 7.0)).round_ties_even().clamp(-8.0, 7.0) * (12.0 / 7.0)).collect();
        assert!(err(&dequantize(&q)) < err(&plain));
    }

    #[test]
    fn int4_packs_low_nibble_first_and_extremes_hit_the_range() {
        let w = [7.0, -7.0, 1.0, 0.0];
        let q = quantize(&w, 1, 4, QuantFormat::Int4 { group: 4 }).unwrap();
        assert_eq!(q.scales, vec![1.0]);
        assert_eq!(q.codes, vec![0x97, 0x01]); // 7 | (-7 & 15) << 4, then 1 | 0 << 4
        assert_eq!(dequantize(&q), w.to_vec());
        // Group adapts to small widths.
        assert_eq!(QuantFormat::Int4 { group: 64 }.for_cols(24).unwrap(), QuantFormat::Int4 { group: 24 });
        assert!(QuantFormat::Int4 { group: 64 }.for_cols(7).is_err());
        let q8 = quantize(&[127.0, -63.5, 0.25], 1, 3, QuantFormat::Int8).unwrap();
        assert_eq!(q8.codes, vec![127, (-64i8) as u8, 0]); // -63.5 ties to even -64
    }
}
