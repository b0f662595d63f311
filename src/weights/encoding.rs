//! How a stored tensor's bytes encode its values, and their exact decoding to f32: plain dtypes,
//! GGML blocks (GGUF files) and ComfyUI's quantized layers (`.comfy_quant` markers, the older
//! scaled-fp8 files). Decoding works on whole rows, so a loader can take rows of a fused tensor
//! (BFL's qkv) without decoding the rest.

use super::ggml::{self, GgmlType};
use crate::dtype::{decode_to_f32, f8e4m3_to_f32, DType};

/// Values of the 16 e2m1 (FP4) codes: sign bit 3, two exponent bits, one mantissa bit.
const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// NVFP4 values per block scale.
pub const NVFP4_BLOCK: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub enum Encoding<'a> {
    /// Plain values of a dtype the engine computes with.
    Dense(DType),
    /// GGML quantization blocks along each row.
    Ggml(GgmlType),
    /// fp8 codes (e4m3, or e5m2 when `e5m2`) times one f32 scale (ComfyUI `float8_e4m3fn`, the
    /// official fp8 releases' `weight_scale`, legacy `scale_weight`).
    /// One scale for the tensor, or one per row.
    ScaledFp8 { scales: Vec<f32>, e5m2: bool },
    /// int8 codes times one scale per tensor (one value) or per row, optionally stored after
    /// ComfyUI's ConvRot rotation (a normalised regular Hadamard matrix on groups of input columns).
    Int8 { scales: Vec<f32>, convrot_group: Option<usize> },
    /// NVFP4: two e2m1 codes a byte (high nibble first), one e4m3 scale per 16 values laid out in
    /// cuBLAS's 128×4 tiles, and one f32 scale for the tensor.
    Nvfp4 { block_scales: &'a [u8], global: f32 },
    /// Something we cannot decode (an integer index tensor, an unknown type); the string says what.
    Unsupported(String),
}

impl Encoding<'_> {
    /// Bytes of one stored row of `cols` logical values, when rows are byte ranges of the data.
    pub fn row_bytes(&self, cols: usize) -> Option<usize> {
        match self {
            Encoding::Dense(d) => Some(cols * d.size_in_bytes()),
            Encoding::Ggml(t) => {
                let (block, _) = t.block();
                cols.is_multiple_of(block).then(|| t.bytes_for(cols)).flatten()
            }
            Encoding::ScaledFp8 { .. } | Encoding::Int8 { .. } => Some(cols),
            Encoding::Nvfp4 { .. } => cols.is_multiple_of(2).then_some(cols / 2),
            Encoding::Unsupported(_) => None,
        }
    }

    /// A short description for messages and `inspect` ("Q4_K", "nvfp4", "fp8 (scaled)", ...).
    pub fn describe(&self) -> String {
        match self {
            Encoding::Dense(d) => d.name().to_string(),
            Encoding::Ggml(t) => t.name().to_string(),
            Encoding::ScaledFp8 { e5m2: false, .. } => "fp8 e4m3 (scaled)".into(),
            Encoding::ScaledFp8 { e5m2: true, .. } => "fp8 e5m2 (scaled)".into(),
            Encoding::Int8 { scales, convrot_group } => {
                let per = if scales.len() == 1 { "tensorwise" } else { "rowwise" };
                match convrot_group {
                    Some(g) => format!("int8 {per}, ConvRot {g}"),
                    None => format!("int8 {per}"),
                }
            }
            Encoding::Nvfp4 { .. } => "nvfp4".into(),
            Encoding::Unsupported(s) => s.clone(),
        }
    }

    /// Decode rows `first..first + rows` of a `[total_rows, cols]` tensor, given exactly those rows'
    /// bytes. Errors are plain reasons; the caller names file and key.
    pub fn decode_rows(&self, bytes: &[u8], first: usize, rows: usize, cols: usize) -> Result<Vec<f32>, String> {
        let row_bytes = self.row_bytes(cols).ok_or_else(|| format!("{} cannot be read row by row", self.describe()))?;
        if bytes.len() != rows * row_bytes {
            return Err(format!("{} bytes for {rows} rows of {row_bytes}", bytes.len()));
        }
        let mut out = match self {
            Encoding::Dense(d) => decode_to_f32(bytes, *d),
            Encoding::Ggml(t) => ggml::dequantize(*t, bytes)?,
            Encoding::ScaledFp8 { scales, e5m2 } => {
                // e5m2 is the high byte of an f16.
                let value =
                    |b: u8| if *e5m2 { half::f16::from_bits((b as u16) << 8).to_f32() } else { f8e4m3_to_f32(b) };
                scaled_rows(bytes, scales, first, rows, cols, value)?
            }
            Encoding::Int8 { scales, .. } => scaled_rows(bytes, scales, first, rows, cols, |b| b as i8 as f32)?,
            Encoding::Nvfp4 { block_scales, global } => nvfp4_rows(bytes, block_scales, *global, first, rows, cols)?,
            Encoding::Unsupported(s) => return Err(format!("values stored as {s} cannot be decoded")),
        };
        if let Encoding::Int8 { convrot_group: Some(g), .. } = self {
            unrotate_convrot(&mut out, cols, *g)?;
        }
        Ok(out)
    }
}

/// One-byte codes times a scale per tensor (one value) or per row.
fn scaled_rows(
    bytes: &[u8],
    scales: &[f32],
    first: usize,
    rows: usize,
    cols: usize,
    value: impl Fn(u8) -> f32,
) -> Result<Vec<f32>, String> {
    if scales.len() != 1 && scales.len() < first + rows {
        return Err(format!("{} row scales for row {}", scales.len(), first + rows - 1));
    }
    let scale_of = |r: usize| if scales.len() == 1 { scales[0] } else { scales[first + r] };
    Ok(bytes
        .chunks(cols)
        .enumerate()
        .flat_map(|(r, row)| row.iter().map(|&b| value(b) * scale_of(r)).collect::<Vec<_>>())
        .collect())
}

/// Index of block scale `(row, block)` in cuBLAS's tiled layout: 128-row × 4-block tiles stored
/// one after another (row tiles outer), each tile as 32 groups of (4 row quarters × 4 blocks).
fn swizzled_scale_index(row: usize, block: usize, blocks_per_row: usize) -> usize {
    let col_tiles = blocks_per_row.div_ceil(4);
    let tile = (row / 128) * col_tiles + block / 4;
    let r = row % 128;
    tile * 512 + (r % 32) * 16 + (r / 32) * 4 + block % 4
}

/// Bytes of NVFP4 block scales for `[rows, cols]` (the tiles pad rows to 128 and blocks to 4).
pub fn nvfp4_scale_bytes(rows: usize, cols: usize) -> usize {
    rows.div_ceil(128) * 128 * (cols / NVFP4_BLOCK).div_ceil(4) * 4
}

fn nvfp4_rows(
    bytes: &[u8],
    block_scales: &[u8],
    global: f32,
    first: usize,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, String> {
    if !cols.is_multiple_of(NVFP4_BLOCK) {
        return Err(format!("{cols} columns are not a multiple of the NVFP4 block of {NVFP4_BLOCK}"));
    }
    let blocks = cols / NVFP4_BLOCK;
    let mut out = Vec::with_capacity(rows * cols);
    for (r, row) in bytes.chunks(cols / 2).enumerate() {
        for (b, pairs) in row.chunks(NVFP4_BLOCK / 2).enumerate() {
            let at = swizzled_scale_index(first + r, b, blocks);
            let code = *block_scales.get(at).ok_or_else(|| format!("block scale {at} is past the scale tensor"))?;
            let scale = f8e4m3_to_f32(code) * global;
            for &byte in pairs {
                out.push(E2M1[(byte >> 4) as usize] * scale);
                out.push(E2M1[(byte & 0x0F) as usize] * scale);
            }
        }
    }
    Ok(out)
}

/// Undo ConvRot: the stored weight is W·Hᵀ per group of `group` input columns, with H the
/// normalised regular Hadamard matrix (Kronecker powers of a symmetric 4×4 one, so H = Hᵀ and
/// H·H = I); multiplying each group by H again restores W.
fn unrotate_convrot(values: &mut [f32], cols: usize, group: usize) -> Result<(), String> {
    if group < 4 || !group.is_power_of_two() || !group.trailing_zeros().is_multiple_of(2) {
        return Err(format!("ConvRot group {group} is not a power of 4"));
    }
    if !cols.is_multiple_of(group) {
        return Err(format!("{cols} columns are not a multiple of the ConvRot group {group}"));
    }
    let h = hadamard(group);
    let mut tmp = vec![0f32; group];
    for chunk in values.chunks_mut(group) {
        for (j, t) in tmp.iter_mut().enumerate() {
            *t = chunk.iter().zip(&h[j * group..(j + 1) * group]).map(|(x, hv)| x * hv).sum();
        }
        chunk.copy_from_slice(&tmp);
    }
    Ok(())
}

/// The normalised regular Hadamard matrix of size `n` (a power of 4), row-major.
fn hadamard(n: usize) -> Vec<f32> {
    const H4: [[f32; 4]; 4] = [[1., 1., 1., -1.], [1., 1., -1., 1.], [1., -1., 1., 1.], [-1., 1., 1., 1.]];
    let mut h = vec![1f32];
    let mut size = 1;
    while size < n {
        let mut next = vec![0f32; size * 4 * size * 4];
        for (i, row) in h.chunks(size).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                for (a, h4row) in H4.iter().enumerate() {
                    for (b, &w) in h4row.iter().enumerate() {
                        next[(i * 4 + a) * size * 4 + j * 4 + b] = v * w;
                    }
                }
            }
        }
        h = next;
        size *= 4;
    }
    let norm = 1.0 / (n as f32).sqrt();
    h.iter_mut().for_each(|v| *v *= norm);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_is_orthogonal_and_symmetric() {
        for n in [4, 16, 64] {
            let h = hadamard(n);
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(h[i * n + j], h[j * n + i]);
                    let dot: f32 = (0..n).map(|k| h[i * n + k] * h[j * n + k]).sum();
                    assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn nvfp4_scale_index_follows_the_tile_layout() {
        // Row 0..31 of tile 0 fill the first 16-byte groups; row 32 starts at offset 4.
        assert_eq!(swizzled_scale_index(0, 0, 4), 0);
        assert_eq!(swizzled_scale_index(0, 3, 4), 3);
        assert_eq!(swizzled_scale_index(1, 0, 4), 16);
        assert_eq!(swizzled_scale_index(32, 0, 4), 4);
        assert_eq!(swizzled_scale_index(127, 3, 4), 31 * 16 + 3 * 4 + 3);
        // The next 4 blocks are the next tile; the next 128 rows come after all column tiles.
        assert_eq!(swizzled_scale_index(0, 4, 8), 512);
        assert_eq!(swizzled_scale_index(128, 0, 8), 1024);
        assert_eq!(nvfp4_scale_bytes(130, 80), 256 * 8);
    }

    #[test]
    fn nvfp4_decodes_high_nibble_first() {
        // One row of 16 values: codes 1..=15 then 0; block scale e4m3 0x38 = 1.0; global 2.
        let bytes: Vec<u8> = (0..8).map(|i| ((2 * i + 1) << 4 | ((2 * i + 2) % 16)) as u8).collect();
        let mut scales = vec![0u8; 512];
        scales[0] = 0x38;
        let enc = Encoding::Nvfp4 { block_scales: &scales, global: 2.0 };
        let v = enc.decode_rows(&bytes, 0, 1, 16).unwrap();
        let want: Vec<f32> = (1..=16).map(|c| E2M1[c % 16] * 2.0).collect();
        assert_eq!(v, want);
    }

    #[test]
    fn int8_rowwise_and_convrot_roundtrip() {
        let enc = Encoding::Int8 { scales: vec![0.5, 2.0], convrot_group: None };
        assert_eq!(enc.decode_rows(&[1, 255, 3, 4], 0, 2, 2).unwrap(), vec![0.5, -0.5, 6.0, 8.0]);
        // A row rotated by H decodes back to the original with H·H = I.
        let w: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 8.0).collect();
        let h = hadamard(16);
        let rotated: Vec<f32> = (0..16).map(|j| (0..16).map(|k| w[k] * h[j * 16 + k]).sum()).collect();
        let scale = rotated.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
        let codes: Vec<u8> = rotated.iter().map(|x| (x / scale).round() as i8 as u8).collect();
        let enc = Encoding::Int8 { scales: vec![scale], convrot_group: Some(16) };
        let back = enc.decode_rows(&codes, 0, 1, 16).unwrap();
        for (a, b) in w.iter().zip(&back) {
            assert!((a - b).abs() < scale * 4.0, "{a} vs {b}");
        }
        assert!(Encoding::Int8 { scales: vec![1.0], convrot_group: Some(8) }.decode_rows(&[0; 8], 0, 1, 8).is_err());
    }
}
