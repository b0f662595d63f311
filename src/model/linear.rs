//! A linear layer's weight: dense in the backend's dtype, or weight-only quantized.

use crate::backend::{Backend, QuantTensor};
use crate::error::Result;
use crate::quant::EncoderPrecision;
use crate::quant::{quantize_rows, QuantFormat, Quantized};
use crate::tensor::Tensor;
use crate::weights::{Encoding, RawTensor, WeightStore};

pub enum Linear {
    Dense(Tensor),
    /// Weight-only quantized: dequantized inside the GEMM, bf16 activations.
    Quant(QuantTensor),
    /// FP8 W8A8: fp8 weights (per-channel scales) and per-token fp8 activations.
    Fp8(QuantTensor),
}

/// The quantized format a precision selects (None: dense bf16).
pub fn format_for(p: EncoderPrecision) -> Option<QuantFormat> {
    match p {
        EncoderPrecision::Bf16 => None,
        EncoderPrecision::Fp8 => Some(QuantFormat::Fp8),
        EncoderPrecision::Int8 => Some(QuantFormat::Int8),
        EncoderPrecision::Int4 => Some(QuantFormat::Int4 { group: crate::quant::INT4_GROUP }),
    }
}

/// The GGML blocks of a row-wise concatenation of `(tensor, rows)` pieces, when every piece is
/// stored in one GGML block type (rows are whole blocks, so rows are byte ranges); else None.
pub fn ggml_blocks<'a>(
    pieces: impl IntoIterator<Item = Result<(RawTensor<'a>, std::ops::Range<usize>)>>,
) -> Result<Option<Quantized>> {
    let (mut ty, mut codes, mut rows, mut cols) = (None, Vec::new(), 0, 0);
    for piece in pieces {
        let (t, range) = piece?;
        let Encoding::Ggml(this) = t.encoding else { return Ok(None) };
        let c: usize = t.shape[1..].iter().product();
        if !this.is_quantized() || ty.is_some_and(|ty| ty != this) || (rows > 0 && c != cols) {
            return Ok(None);
        }
        let Some(rb) = t.encoding.row_bytes(c) else { return Ok(None) };
        codes.extend_from_slice(&t.bytes[range.start * rb..range.end * rb]);
        (ty, rows, cols) = (Some(this), rows + range.len(), c);
    }
    Ok(ty.map(|t| Quantized { format: QuantFormat::Ggml(t), rows, cols, codes, scales: Vec::new() }))
}

/// The e4m3 codes and per-row scales of a row concatenation of stored pieces that are all e4m3,
/// with a scale (official -fp8 releases, ComfyUI float8 layers) or plain, and whether any piece
/// had a scale; None when a piece is stored otherwise. The engine's FP8 format is exactly that.
pub fn fp8_codes<'a>(
    pieces: impl IntoIterator<Item = Result<(RawTensor<'a>, std::ops::Range<usize>)>>,
) -> Result<Option<(Quantized, bool)>> {
    let (mut codes, mut scales, mut scaled, mut cols) = (Vec::new(), Vec::new(), false, None);
    for piece in pieces {
        let (t, rows) = piece?;
        let c: usize = t.shape[1..].iter().product();
        let Some(stored_scales) = e4m3_scales(&t.encoding) else { return Ok(None) };
        scaled |= stored_scales.is_some();
        let per_row = stored_scales.unwrap_or(&[1.0]);
        if cols.is_some_and(|cols| cols != c) {
            return Ok(None);
        }
        cols = Some(c);
        codes.extend_from_slice(&t.bytes[rows.start * c..rows.end * c]);
        scales.extend(rows.map(|r| if per_row.len() == 1 { per_row[0] } else { per_row[r] }));
    }
    let Some(cols) = cols else { return Ok(None) };
    Ok(Some((Quantized { format: QuantFormat::Fp8, rows: scales.len(), cols, codes, scales }, scaled)))
}

/// The scales of an e4m3 tensor (one, or one per row; None for plain e4m3), or None when it is
/// stored otherwise: what `fp8_codes` takes as the engine's FP8 format.
pub fn e4m3_scales<'e>(encoding: &'e Encoding<'_>) -> Option<Option<&'e [f32]>> {
    match encoding {
        Encoding::ScaledFp8 { scales, e5m2: false } => Some(Some(scales)),
        Encoding::Dense(crate::dtype::DType::F8E4M3) => Some(None),
        _ => None,
    }
}

/// `quantize` of the row concatenation of stored pieces (rows `range` of each tensor, `cols`
/// values a row): rows decoded from the file and quantized in parallel, never the whole weight
/// in f32.
pub fn quantize_pieces(
    pieces: &[(RawTensor<'_>, std::ops::Range<usize>)],
    cols: usize,
    format: QuantFormat,
) -> Result<Quantized> {
    let starts: Vec<usize> = pieces.iter().scan(0, |at, (_, r)| Some(std::mem::replace(at, *at + r.len()))).collect();
    let rows = pieces.iter().map(|(_, r)| r.len()).sum();
    quantize_rows(rows, cols, format, |r, out| {
        let i = starts.partition_point(|&s| s <= r) - 1;
        let (t, range) = &pieces[i];
        let at = range.start + r - starts[i];
        out.copy_from_slice(&t.rows_f32(at..at + 1)?);
        Ok(())
    })
}

impl Linear {
    /// Row-wise concatenation of stored weights `names` (each `[rows_i, cols]`): dense weights go
    /// straight from the file to the device; quantized ones are quantized on the host at load.
    pub fn load(
        be: &dyn Backend,
        store: &WeightStore,
        names: &[(&str, usize)],
        cols: usize,
        format: Option<QuantFormat>,
    ) -> Result<Linear> {
        if format.is_none() {
            // GGUF blocks stay quantized on the device: the weight-only GEMM decodes them.
            let pieces = names.iter().map(|(n, r)| store.get_shaped(n, &[*r, cols]).map(|t| (t, 0..*r)));
            if let Some(q) = ggml_blocks(pieces)? {
                return Ok(Linear::Quant(be.load_quantized(&q)?));
            }
            // Scaled FP8 checkpoint layers kept as weight-only FP8 where the backend keeps such codes.
            if be.keeps_fp8_codes() {
                let pieces = names.iter().map(|(n, r)| store.get_shaped(n, &[*r, cols]).map(|t| (t, 0..*r)));
                if let Some((q, true)) = fp8_codes(pieces)? {
                    return Ok(Linear::Quant(be.load_quantized(&q)?));
                }
            }
        }
        match format {
            None => {
                let parts =
                    names.iter().map(|(n, rows)| store.load(be, n, &[*rows, cols])).collect::<Result<Vec<_>>>()?;
                if parts.len() == 1 {
                    return Ok(Linear::Dense(parts.into_iter().next().unwrap()));
                }
                Ok(Linear::Dense(be.concat(&parts.iter().collect::<Vec<_>>(), 0)?))
            }
            Some(fmt) => {
                let pieces = names
                    .iter()
                    .map(|(n, r)| Ok((store.get_shaped(n, &[*r, cols])?, 0..*r)))
                    .collect::<Result<Vec<_>>>()?;
                let q = quantize_pieces(&pieces, cols, fmt)?;
                Ok(Linear::Quant(be.load_quantized(&q)?))
            }
        }
    }

    pub fn forward(&self, be: &dyn Backend, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Linear::Dense(w) => be.linear(x, w, bias),
            Linear::Quant(q) => be.linear_quantized(x, q, bias),
            Linear::Fp8(q) => be.linear_fp8(x, q, bias),
        }
    }
}
