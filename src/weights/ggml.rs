//! GGML's tensor types as GGUF files store them, and their dequantisation to f32, bit for bit as
//! the reference (ggml-quants.c, and the `gguf` package's numpy port the fixtures come from)
//! computes it: each product and difference rounded in f32, in the same order, no fused
//! multiply-add. Our own code rather than a crate's: the same block layouts are what the GPU's
//! weight-only GEMM will read, so we own them.

use half::f16;

/// The GGML types a GGUF tensor may have that flux2 reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements per K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// From GGUF's type id (`ggml_type`); None for types flux2 does not read.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// GGUF's type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The block types (every type but the plain F32, F16, BF16).
    pub const QUANTIZED: [GgmlType; 10] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Byte ranges of one block that hold f16 scales (the rest are codes and packed sub-scales).
    fn f16_fields(self) -> &'static [usize] {
        match self {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q6K => &[208],
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
        }
    }

    /// GGML's name for a type id, known or not (for messages).
    pub fn name_of_id(id: u32) -> String {
        match GgmlType::from_id(id) {
            Some(t) => t.name().to_string(),
            None => match id {
                9 => "Q8_1".into(),
                15 => "Q8_K".into(),
                16..=23 | 29 => format!("IQ type {id}"),
                _ => format!("type {id}"),
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (QK_K, 84),
            GgmlType::Q3K => (QK_K, 110),
            GgmlType::Q4K => (QK_K, 144),
            GgmlType::Q5K => (QK_K, 176),
            GgmlType::Q6K => (QK_K, 210),
        }
    }

    /// Bytes of `n` elements, or None when `n` is not whole blocks or the size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (block, size) = self.block();
        (n % block == 0).then(|| (n / block).checked_mul(size)).flatten()
    }

    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }
}

/// Random, valid blocks of `ty` for `n` elements (every code byte random, the f16 scales finite
/// and moderate): test and selftest inputs that exercise every bit of a block's layout.
pub fn synthetic_blocks(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let (block, size) = ty.block();
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out: Vec<u8> = (0..n.div_ceil(block) * size).map(|_| next() as u8).collect();
    for b in out.chunks_mut(size) {
        for &at in ty.f16_fields() {
            // Scales in ±[0.001, 0.05): products stay far from f16/f32 limits.
            let v = (0.001 + (next() % 1000) as f32 * 4.9e-5) * if next() % 2 == 0 { 1.0 } else { -1.0 };
            b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
    }
    out
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantise `bytes` (whole blocks of `ty`) to f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let (block, size) = ty.block();
    if bytes.len() % size != 0 {
        return Err(format!("{} bytes are not whole {} blocks of {size} bytes", bytes.len(), ty.name()));
    }
    let mut out = Vec::with_capacity(bytes.len() / size * block);
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)))
        }
        _ => {
            for b in bytes.chunks_exact(size) {
                let start = out.len();
                out.resize(start + block, 0.0);
                dequantize_block(ty, b, &mut out[start..]);
            }
        }
    }
    Ok(out)
}

/// The 4-bit quant `e` of a block whose 16 bytes hold elements j (low nibble) and j + 16 (high).
fn nibble32(qs: &[u8], e: usize) -> u8 {
    (qs[e % 16] >> (4 * (e / 16))) & 0x0F
}

/// Q4_K/Q5_K's eight 6-bit (scale, min) pairs from their 12 packed bytes.
pub fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// One block of `ty` (`ty.block().1` bytes) into `y` (`ty.block().0` values).
pub fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for (e, v) in y.iter_mut().enumerate() {
                *v = d * (nibble32(&b[2..], e) as i8 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (e, v) in y.iter_mut().enumerate() {
                *v = d * nibble32(&b[4..], e) as f32 + m;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let with_min = ty == GgmlType::Q5_1;
            let d = f16_at(b, 0);
            let m = if with_min { f16_at(b, 2) } else { 0.0 };
            let at = if with_min { 4 } else { 2 };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            for (e, v) in y.iter_mut().enumerate() {
                let q = nibble32(&b[at + 4..], e) | ((((qh >> e) & 1) as u8) << 4);
                *v = if with_min { d * q as f32 + m } else { d * (q as i8 - 16) as f32 };
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (e, v) in y.iter_mut().enumerate() {
                *v = b[2 + e] as i8 as f32 * d;
            }
        }
        GgmlType::Q2K => {
            let (scales, qs) = (&b[..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (e, v) in y.iter_mut().enumerate() {
                let (half, shift, l) = (e / 128, (e % 128) / 32, e % 32);
                let q = (qs[half * 32 + l] >> (2 * shift)) & 3;
                let k = e / 16;
                let dl = d * (scales[k] & 0x0F) as f32;
                let ml = dmin * (scales[k] >> 4) as f32;
                *v = dl * q as f32 - ml;
            }
        }
        GgmlType::Q3K => {
            let (hmask, qs, scales) = (&b[..32], &b[32..96], &b[96..108]);
            let d = f16_at(b, 108);
            let mut dl = [0f32; 16];
            for (k, dl) in dl.iter_mut().enumerate() {
                let low = (scales[k % 8] >> (4 * (k / 8))) & 0x0F;
                let high = (scales[8 + k % 4] >> (2 * (k / 4))) & 0x03;
                *dl = d * ((low | (high << 4)) as i8 - 32) as f32;
            }
            for (e, v) in y.iter_mut().enumerate() {
                let (half, shift, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = (qs[half * 32 + l] >> (2 * shift)) & 3;
                // The high bit subtracts 4 when it is clear (ggml's hmask convention).
                let high = ((hmask[l] >> (e / 32)) & 1) ^ 1;
                *v = dl[e / 16] * (low as i8 - (high << 2) as i8) as f32;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, mn) = scale_min_k4(&b[4..16]);
            let (qh, qs) = if ty == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for (e, v) in y.iter_mut().enumerate() {
                let (chunk, shift, l) = (e / 64, (e % 64) / 32, e % 32);
                let mut q = (qs[chunk * 32 + l] >> (4 * shift)) & 0x0F;
                if let Some(qh) = qh {
                    q |= ((qh[l] >> (e / 32)) & 1) << 4;
                }
                let k = e / 32;
                *v = d * sc[k] as f32 * q as f32 - dmin * mn[k] as f32;
            }
        }
        GgmlType::Q6K => {
            let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for (e, v) in y.iter_mut().enumerate() {
                let half = e / 128;
                let low = (ql[half * 64 + e % 64] >> (4 * ((e % 128) / 64))) & 0x0F;
                let high = (qh[half * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 0x03;
                let q = (low | (high << 4)) as i8 - 32;
                *v = d * scales[e / 16] as i8 as f32 * q as f32;
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("element types are decoded above"),
    }
}
