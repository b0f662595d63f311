//! Weight-only quantization formats (what `--text-encoder-precision` selects): the exact math the
//! GPU kernels dequantize with, and the CPU reference of it. Symmetric, round to nearest even.
//!   int8: one f32 scale per output row, codes in [-127, 127];
//!   int4: one f32 scale per row and group of input columns (the clipping of the group's |w|max
//!         with the least squared error), codes in [-8, 7], two per byte (low nibble first);
//!   fp8:  one f32 scale per output row, e4m3 codes (|w|max maps to 448).
//!   ggml: GGUF's blocks as the file stores them (scales inside the blocks), decoded exactly as
//!         ggml does; never made here, only carried from a checkpoint to the weight-only GEMM.

use rayon::prelude::*;

use crate::dtype::{f32_to_f8e4m3, f8e4m3_to_f32, round_even, F8E4M3_MAX};
use crate::error::{Error, Result};
use crate::weights::ggml::{self, GgmlType};

/// Storage of the transformer's block linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum TransformerPrecision {
    Bf16,
    /// FP8 e4m3 block linears with per-output-channel f32 scales; embedders, modulation and the
    /// final layer stay bf16 (as the official FP8 releases do).
    Fp8,
}

/// Storage of the text encoder's linears (embeddings stay bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum EncoderPrecision {
    Bf16,
    Fp8,
    /// int8 per output channel, f32 scales.
    Int8,
    /// 4-bit groups of 64 along the input dim, f32 scales.
    Int4,
}

pub const INT4_GROUP: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    Int8,
    Int4 {
        group: usize,
    },
    Fp8,
    /// GGML block quantization (a block type, not F32/F16/BF16).
    Ggml(GgmlType),
}

impl QuantFormat {
    /// Kernel format id (kernels/gemm.cu).
    pub fn id(self) -> i32 {
        match self {
            QuantFormat::Int8 => 0,
            QuantFormat::Int4 { .. } => 1,
            QuantFormat::Fp8 => 2,
            // 16 + GGUF's type id: the kernel decodes the block type itself.
            QuantFormat::Ggml(t) => 16 + t.id() as i32,
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
            QuantFormat::Ggml(t) if !t.is_quantized() || !cols.is_multiple_of(t.block().0) => Err(Error::shape(
                "ggml",
                format!("{cols} input columns are not whole {} blocks of {}", t.name(), t.block().0),
            )),
            f => Ok(f),
        }
    }

    pub fn code_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            QuantFormat::Int4 { .. } => rows * cols / 2,
            QuantFormat::Ggml(t) => rows * t.bytes_for(cols).unwrap_or(0),
            _ => rows * cols,
        }
    }

    pub fn scale_count(self, rows: usize, cols: usize) -> usize {
        match self {
            QuantFormat::Int4 { group } => rows * cols / group,
            QuantFormat::Ggml(_) => 0,
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

/// The int4 code of `x / s`, before masking to a nibble (|x / s| stays far below 2^22: s is at
/// least 60% of the group's |w|max / 7).
#[inline(always)]
fn int4_code(x: f32, s: f32) -> f32 {
    round_even(x / s).clamp(-8.0, 7.0)
}

/// The int4 scale of one group: the clipping of |w|max (to 100%, 95%, ... 60%) with the least
/// squared error. Clipping a rare large weight keeps the other 63 on a finer grid.
fn int4_scale(chunk: &[f32]) -> f32 {
    let top = absmax(chunk);
    if top == 0.0 {
        return 0.0;
    }
    let error = |s: f32| -> f32 {
        // Eight partial sums: an order the compiler can vectorise.
        let mut acc = [0f32; 8];
        let mut lanes = chunk.chunks_exact(8);
        for c in &mut lanes {
            for (a, &x) in acc.iter_mut().zip(c) {
                let d = x - int4_code(x, s) * s;
                *a += d * d;
            }
        }
        for (a, &x) in acc.iter_mut().zip(lanes.remainder()) {
            let d = x - int4_code(x, s) * s;
            *a += d * d;
        }
        acc.iter().sum()
    };
    (0..9)
        .map(|i| top * (1.0 - 0.05 * i as f32) / 7.0)
        .map(|s| (error(s), s))
        .fold((f32::INFINITY, top / 7.0), |best, c| if c.0 < best.0 { c } else { best })
        .1
}

impl Quantized {
    /// Codes and scales of the sizes the format requires (a weight from a file must be checked
    /// before a kernel indexes it).
    pub fn validate(&self) -> Result<()> {
        self.format.for_cols(self.cols)?;
        let (codes, scales) =
            (self.format.code_bytes(self.rows, self.cols), self.format.scale_count(self.rows, self.cols));
        if self.codes.len() != codes || self.scales.len() != scales {
            return Err(Error::shape(
                "quantized weight",
                format!(
                    "{:?} [{}, {}] needs {codes} code bytes and {scales} scales, not {} and {}",
                    self.format,
                    self.rows,
                    self.cols,
                    self.codes.len(),
                    self.scales.len()
                ),
            ));
        }
        Ok(())
    }
}

pub fn quantize(w: &[f32], rows: usize, cols: usize, format: QuantFormat) -> Result<Quantized> {
    if w.len() != rows * cols {
        return Err(Error::shape("quantize", format!("{} values for [{rows}, {cols}]", w.len())));
    }
    quantize_rows(rows, cols, format, |r, out| {
        out.copy_from_slice(&w[r * cols..(r + 1) * cols]);
        Ok(())
    })
}

/// `quantize` of a `[rows, cols]` weight whose row r `row(r, out)` writes as f32 (decoded from a
/// file, say): rows are read and quantized in parallel, one row's values at a time per thread,
/// never the whole weight in f32.
pub fn quantize_rows(
    rows: usize,
    cols: usize,
    format: QuantFormat,
    row: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<Quantized> {
    if let QuantFormat::Ggml(t) = format {
        return Err(Error::InvalidArgument(format!("{} blocks are read from GGUF files, not made here", t.name())));
    }
    let format = format.for_cols(cols)?;
    let mut codes = vec![0u8; format.code_bytes(rows, cols)];
    let mut scales = vec![0f32; format.scale_count(rows, cols)];
    if rows == 0 || cols == 0 {
        return Ok(Quantized { format, rows, cols, codes, scales });
    }
    let (row_codes, row_scales) = (codes.len() / rows, scales.len() / rows);
    codes.par_chunks_mut(row_codes).zip(scales.par_chunks_mut(row_scales)).enumerate().try_for_each_init(
        || vec![0f32; cols],
        |values, (r, (codes, scales))| {
            row(r, values)?;
            quantize_row(format, values, codes, scales);
            Ok(())
        },
    )?;
    Ok(Quantized { format, rows, cols, codes, scales })
}

/// One row's codes (zeroed before) and scales.
fn quantize_row(format: QuantFormat, row: &[f32], codes: &mut [u8], scales: &mut [f32]) {
    match format {
        QuantFormat::Int8 | QuantFormat::Fp8 => {
            let top = if format == QuantFormat::Int8 { 127.0 } else { F8E4M3_MAX };
            let s = absmax(row) / top;
            scales[0] = s;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            if format == QuantFormat::Int8 {
                // |x·inv| <= 127 (up to rounding): within round_even's range.
                for (code, &x) in codes.iter_mut().zip(row) {
                    *code = round_even(x * inv).clamp(-127.0, 127.0) as i8 as u8;
                }
            } else {
                for (code, &x) in codes.iter_mut().zip(row) {
                    *code = f32_to_f8e4m3(x * inv);
                }
            }
        }
        QuantFormat::Int4 { group } => {
            for (g, chunk) in row.chunks_exact(group).enumerate() {
                let s = int4_scale(chunk);
                scales[g] = s;
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                for (i, &x) in chunk.iter().enumerate() {
                    let q = (round_even(x * inv).clamp(-8.0, 7.0) as i8 as u8) & 0x0F;
                    let k = g * group + i;
                    codes[k / 2] |= if k % 2 == 0 { q } else { q << 4 };
                }
            }
        }
        QuantFormat::Ggml(_) => unreachable!("refused by quantize_rows"),
    }
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
        QuantFormat::Ggml(t) => {
            let (block, size) = t.block();
            let i = r * q.cols + c;
            let at = i / block * size;
            ggml::dequantize(t, &q.codes[at..at + size]).map(|v| v[i % block]).unwrap_or(f32::NAN)
        }
    }
}

pub fn dequantize(q: &Quantized) -> Vec<f32> {
    if let QuantFormat::Ggml(t) = q.format {
        // Whole blocks at once; a size error was caught by `validate` (NaN, never a panic, if not).
        return ggml::dequantize(t, &q.codes).unwrap_or_else(|_| vec![f32::NAN; q.rows * q.cols]);
    }
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
                        QuantFormat::Ggml(_) => unreachable!("not made by quantize"),
                    };
                    assert!((x - y).abs() <= bound * 1.0001 + 1e-7, "{fmt:?} ({r},{c}): {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn ggml_blocks_are_carried_not_made_and_checked_for_size() {
        use crate::weights::ggml::{synthetic_blocks, GgmlType};
        assert!(quantize(&[0.0; 32], 1, 32, QuantFormat::Ggml(GgmlType::Q8_0)).is_err());
        let codes = synthetic_blocks(GgmlType::Q4K, 2 * 256, 1);
        let q = Quantized { format: QuantFormat::Ggml(GgmlType::Q4K), rows: 2, cols: 256, codes, scales: vec![] };
        q.validate().unwrap();
        // Element access and whole dequantization agree with ggml's decoder.
        let d = dequantize(&q);
        assert_eq!(d, crate::weights::ggml::dequantize(GgmlType::Q4K, &q.codes).unwrap());
        assert_eq!(dequant_at(&q, 1, 7), d[256 + 7]);
        let short = Quantized { codes: q.codes[..100].to_vec(), ..q.clone() };
        assert!(short.validate().is_err());
        let ragged = Quantized { cols: 200, ..q };
        assert!(ragged.validate().is_err());
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
