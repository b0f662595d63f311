//! A weight matrix as the mixed GEMM reads it: its stored bytes and how they encode values
//! (plain bf16/f16/fp8 elements, or `quant`'s weight-only codes with their scales). Every path
//! reads it through `row_f32` (exact, as `quant::dequant_at`); v4 also has vector loaders for
//! the common encodings (`v4_amx_pack`).

use crate::backend::QuantTensor;
use crate::dtype::{f8e4m3_to_f32, DType};
use crate::quant::QuantFormat;
use crate::tensor::{CpuStorage, Tensor};
use crate::weights::ggml;

/// How a weight's bytes encode its values.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Code<'a> {
    /// Plain elements of a dtype (bf16, f16, fp8 e4m3).
    Plain(DType),
    /// Weight-only quantized codes and their f32 scales (none for GGML blocks, which carry theirs).
    Quant(QuantFormat, &'a [f32]),
}

/// A row-major `[n × k]` weight matrix in its stored encoding.
#[derive(Clone, Copy)]
pub(crate) struct Weights<'a> {
    pub bytes: &'a [u8],
    pub code: Code<'a>,
    pub n: usize,
    pub k: usize,
}

impl<'a> Weights<'a> {
    pub fn plain(bytes: &'a [u8], dtype: DType, n: usize, k: usize) -> Weights<'a> {
        Weights { bytes, code: Code::Plain(dtype), n, k }
    }

    /// Whether the weight is plain elements of `dtype`.
    pub fn is(&self, dtype: DType) -> bool {
        matches!(self.code, Code::Plain(d) if d == dtype)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        match self.code {
            Code::Plain(d) => self.k * d.size_in_bytes(),
            Code::Quant(f, _) => f.code_bytes(1, self.k),
        }
    }

    /// The bytes of a row that hold columns `k0..k1` (whole encoding units: nibble pairs, blocks).
    pub fn col_bytes(&self, k0: usize, k1: usize) -> std::ops::Range<usize> {
        match self.code {
            Code::Plain(d) => k0 * d.size_in_bytes()..k1 * d.size_in_bytes(),
            Code::Quant(QuantFormat::Int4 { .. }, _) => k0 / 2..k1.div_ceil(2),
            Code::Quant(QuantFormat::Ggml(t), _) => {
                let (block, size) = t.block();
                k0 / block * size..k1.div_ceil(block) * size
            }
            Code::Quant(..) => k0..k1,
        }
    }

    /// Row `row`, columns `k0..k0 + out.len()`, as f32: plain elements widened (exact), codes
    /// times their scale in f32 (the GPU's and `quant::dequant_at`'s arithmetic).
    pub fn row_f32(&self, row: usize, k0: usize, out: &mut [f32]) {
        let at = row * self.row_bytes();
        let bytes = &self.bytes[at..at + self.row_bytes()];
        let src = &bytes[self.col_bytes(k0, k0 + out.len())];
        match self.code {
            Code::Plain(DType::BF16) => src.chunks_exact(2).zip(out).for_each(|(b, o)| {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }),
            Code::Plain(DType::F16) => src.chunks_exact(2).zip(out).for_each(|(b, o)| {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }),
            Code::Plain(DType::F8E4M3) => src.iter().zip(out).for_each(|(&b, o)| *o = f8e4m3_to_f32(b)),
            Code::Plain(DType::F32) => src.chunks_exact(4).zip(out).for_each(|(b, o)| {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }),
            Code::Plain(DType::U8) => unreachable!("refused by Weights::of"),
            Code::Quant(QuantFormat::Int8, s) => src.iter().zip(out).for_each(|(&b, o)| *o = b as i8 as f32 * s[row]),
            Code::Quant(QuantFormat::Fp8, s) => src.iter().zip(out).for_each(|(&b, o)| *o = f8e4m3_to_f32(b) * s[row]),
            Code::Quant(QuantFormat::Int4 { group }, s) => {
                let scales = &s[row * (self.k / group)..];
                for (i, o) in out.iter_mut().enumerate() {
                    let c = k0 + i;
                    let nibble = bytes[c / 2] >> (4 * (c % 2)) & 0x0F;
                    *o = ((nibble << 4) as i8 >> 4) as f32 * scales[c / group];
                }
            }
            Code::Quant(QuantFormat::Ggml(t), _) => {
                let (block, size) = t.block();
                let mut values = [0f32; 256];
                let (mut c, end) = (k0, k0 + out.len());
                while c < end {
                    // Whole blocks are decoded; the range may start or end inside one.
                    let b = c / block;
                    ggml::dequantize_block(t, &bytes[b * size..(b + 1) * size], &mut values[..block]);
                    let (from, len) = (c % block, (block - c % block).min(end - c));
                    out[c - k0..c - k0 + len].copy_from_slice(&values[from..from + len]);
                    c += len;
                }
            }
        }
    }

    /// The weight of a linear layer as row blocks (one, or one per mapped piece of a fused
    /// projection), if it is a dense non-f32 CPU tensor.
    pub fn of(w: &'a Tensor) -> Option<Vec<Weights<'a>>> {
        let storage = w.cpu_storage()?;
        let (dtype, size) = (storage.dtype(), storage.dtype().size_in_bytes());
        if !w.is_contiguous() || w.rank() != 2 || dtype == DType::U8 || dtype == DType::F32 {
            return None;
        }
        let k = w.dim(1);
        if let CpuStorage::MappedRows(pieces, _) = storage {
            // A whole fused weight: every piece is a block of complete rows.
            if w.offset() != 0 || w.numel() != storage.len() || k == 0 {
                return None;
            }
            let rows = |len: usize| len.is_multiple_of(k * size).then_some(len / (k * size));
            return pieces.iter().map(|p| Some(Weights::plain(p.bytes(), dtype, rows(p.len())?, k))).collect();
        }
        let bytes = storage.raw_bytes()?;
        let bytes = &bytes[w.offset() * size..(w.offset() + w.numel()) * size];
        Some(vec![Weights::plain(bytes, dtype, w.dim(0), k)])
    }

    /// A weight-only quantized weight whose codes the CPU keeps (`CpuBackend::load_quantized` in
    /// bf16 precision), if its codes and scales have the sizes its format needs.
    pub fn of_quantized(q: &'a QuantTensor) -> Option<Weights<'a>> {
        let codes = match q.data.cpu_storage()? {
            CpuStorage::U8(codes) if q.data.offset() == 0 => codes.as_slice(),
            _ => return None,
        };
        let scales: &[f32] = match q.scales.as_ref().map(|s| (s.offset(), s.cpu_storage())) {
            None => &[],
            Some((0, Some(CpuStorage::F32(s)))) => s,
            Some(_) => return None,
        };
        let format = q.format.for_cols(q.cols).ok().filter(|f| *f == q.format)?;
        let fits = codes.len() == format.code_bytes(q.rows, q.cols)
            && scales.len() == format.scale_count(q.rows, q.cols)
            && !matches!(format, QuantFormat::Ggml(t) if t.block().0 > 256);
        fits.then_some(Weights { bytes: codes, code: Code::Quant(format, scales), n: q.rows, k: q.cols })
    }
}
