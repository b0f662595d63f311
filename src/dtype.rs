//! Element types the engine stores. Compute on the CPU is always f32; these are storage formats.

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// OCP FP8 E4M3 "fn" variant (no infinities, 0x7F/0xFF are NaN, max 448), as in torch.float8_e4m3fn.
    F8E4M3,
    /// Raw bytes: packed quantized codes (their format says how to read them).
    U8,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 | DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8e4m3",
            DType::U8 => "u8",
        }
    }

    /// The safetensors spelling of this dtype.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F8E4M3 => "F8_E4M3",
            DType::U8 => "U8",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "fp16" | "float16" => Some(DType::F16),
            "f8e4m3" | "fp8" | "f8_e4m3" | "float8_e4m3fn" => Some(DType::F8E4M3),
            _ => None,
        }
    }

    /// Relative rounding error of one value stored in this dtype (half an ulp at 1.0).
    pub fn unit_roundoff(self) -> f32 {
        match self {
            DType::F32 => f32::EPSILON / 2.0,
            DType::BF16 => 1.0 / 256.0,
            DType::F16 => 1.0 / 2048.0,
            DType::F8E4M3 => 1.0 / 16.0,
            DType::U8 => 0.5,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Largest finite value of FP8 E4M3FN.
pub const F8E4M3_MAX: f32 = 448.0;

/// f32 -> FP8 E4M3FN, round to nearest even, saturating to ±448 (NaN stays NaN).
/// Saturation matches CUDA's `__NV_SATFINITE` conversion, which the GPU kernels use.
#[inline]
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return 0x7F; // NaN
    }
    if a >= 0x43E8_0000 {
        return sign | 0x7E; // >= 464 (incl. inf) saturates to 448
    }
    if a < 0x3C80_0000 {
        // Below the smallest normal (2^-6): multiples of 2^-9; 8 is the smallest normal's code.
        return sign | (f32::from_bits(a) * 512.0).round_ties_even() as u8;
    }
    // Normal: keep 3 mantissa bits, rounding to nearest even through the carry into the exponent.
    let rounded = a + 0x7_FFFF + ((a >> 20) & 1);
    let exp = (rounded >> 23) as i32 - 127 + 7;
    sign | ((exp as u32) << 3 | (rounded >> 20) & 7) as u8
}

/// `f8e4m3_to_f32(f32_to_f8e4m3(x))` without the table or branches, so loops over it vectorise:
/// the e4m3 value nearest to x (ties to even), saturated at ±448; NaN stays NaN. Bit-identical to
/// the round trip through the code (tested over a sweep of every exponent).
#[inline(always)]
pub fn f8e4m3_round(x: f32) -> f32 {
    let bits = x.to_bits();
    let (sign, a) = (bits & 0x8000_0000, bits & 0x7FFF_FFFF);
    // Normal range: keep 3 mantissa bits, rounding to nearest even through the carry.
    let normal = (a.wrapping_add(0x7_FFFF + ((a >> 20) & 1))) & 0xFFF0_0000;
    // Below 2^-6: multiples of 2^-9 (|x|·512 < 8, well inside round_even's range).
    let tiny = (round_even(f32::from_bits(a) * 512.0) / 512.0).to_bits();
    let magnitude = if a < 0x3C80_0000 {
        tiny
    } else if a >= 0x43E8_0000 {
        0x43E0_0000
    } else {
        normal
    };
    if a > 0x7F80_0000 {
        f32::NAN
    } else {
        f32::from_bits(sign | magnitude)
    }
}

/// `x.round_ties_even()` for |x| < 2^22 (adding and subtracting 1.5·2^23 rounds to an integer in
/// the default rounding mode), in a form the compiler vectorises: `round_ties_even` is a libm call
/// on baseline x86-64. NaN stays NaN.
#[inline(always)]
pub fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// FP8 E4M3FN -> f32 (exact), from a table.
#[inline]
pub fn f8e4m3_to_f32(b: u8) -> f32 {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| f8e4m3_decode(i as u8)))[b as usize]
}

fn f8e4m3_decode(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0F) as i32;
    let mant = (b & 0x07) as f32;
    if exp == 15 && (b & 0x07) == 7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Decode raw little-endian bytes of `dtype` into f32 values.
pub fn decode_to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => {
            bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        DType::F16 => {
            bytes.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        DType::F8E4M3 => bytes.iter().map(|&b| f8e4m3_to_f32(b)).collect(),
        DType::U8 => bytes.iter().map(|&b| b as f32).collect(),
    }
}

/// Encode f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn encode_from_f32(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        DType::F8E4M3 => values.iter().map(|v| f32_to_f8e4m3(*v)).collect(),
        DType::U8 => values.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect(),
    }
}

/// Round every value through `dtype` and back (what storing an activation in that dtype does).
pub fn round_through(values: &mut [f32], dtype: DType) {
    match dtype {
        DType::F32 => {}
        DType::BF16 => values.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        DType::F16 => values.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        DType::F8E4M3 => values.iter_mut().for_each(|v| *v = f8e4m3_to_f32(f32_to_f8e4m3(*v))),
        DType::U8 => values.iter_mut().for_each(|v| *v = v.round().clamp(0.0, 255.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_rounding_matches_the_code_round_trip() {
        // Every exponent, a spread of mantissas, both signs, the saturation and tie points.
        let edges =
            [0.0f32, -0.0, 448.0, 463.99, 464.0, 480.0, 1e30, f32::INFINITY, f32::NAN, 2f32.powi(-6), 2f32.powi(-10)];
        let sweep = (0..=u32::MAX / 0x1001).map(|i| f32::from_bits(i.wrapping_mul(0x1001)));
        for x in edges.into_iter().chain(edges.map(|e| -e)).chain(sweep) {
            let (got, want) = (f8e4m3_round(x), f8e4m3_to_f32(f32_to_f8e4m3(x)));
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{x:e}: {got:e} vs {want:e}");
        }
    }

    #[test]
    fn fp8_roundtrips_every_finite_code() {
        for b in 0u16..=255 {
            let b = b as u8;
            let v = f8e4m3_to_f32(b);
            if v.is_nan() {
                assert_eq!(b & 0x7F, 0x7F);
                continue;
            }
            let back = f32_to_f8e4m3(v);
            // +0 and -0 are distinct codes that both decode to zero.
            assert!(back == b || (v == 0.0 && back & 0x7F == 0), "code {b:#x} -> {v} -> {back:#x}");
        }
    }

    /// The bit-level encoder against a direct definition: the nearest of the 254 finite codes,
    /// ties to the even code, saturating.
    #[test]
    fn fp8_encoder_matches_nearest_even_definition() {
        let finite: Vec<(f32, u8)> = (0u8..=0x7E).map(|c| (f8e4m3_to_f32(c), c)).collect();
        let reference = |x: f32| -> u8 {
            let a = x.abs().min(448.0);
            let mut best = (f32::INFINITY, 0u8);
            for &(v, c) in &finite {
                let d = (v - a).abs();
                if d < best.0 || (d == best.0 && c % 2 == 0) {
                    best = (d, c);
                }
            }
            best.1 | if x.is_sign_negative() { 0x80 } else { 0 }
        };
        let key = crate::rng::stream_key(1, "fp8");
        for i in 0..200_000u64 {
            let x = crate::rng::normal(key, i) * 2f32.powi((i % 24) as i32 - 12);
            assert_eq!(f32_to_f8e4m3(x), reference(x), "{x}");
        }
        for &(v, c) in &finite {
            assert_eq!(f32_to_f8e4m3(v), c);
            assert_eq!(f32_to_f8e4m3(-v), if v == 0.0 { 0x80 } else { c | 0x80 });
        }
        // Midpoints between neighbours tie to the even code.
        for w in finite.windows(2) {
            let mid = (w[0].0 + w[1].0) / 2.0;
            assert_eq!(f32_to_f8e4m3(mid), reference(mid), "midpoint {mid}");
        }
        assert_eq!(f32_to_f8e4m3(464.0), 0x7E);
        assert_eq!(f32_to_f8e4m3(f32::INFINITY), 0x7E);
    }

    #[test]
    fn fp8_known_values_and_rounding() {
        assert_eq!(f8e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f32_to_f8e4m3(1.0), 0x38);
        assert_eq!(f32_to_f8e4m3(-2.0), 0xC0);
        assert_eq!(f32_to_f8e4m3(1000.0), 0x7E); // saturates
        assert_eq!(f32_to_f8e4m3(-1000.0), 0xFE);
        // 1.0625 is halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1): ties to even -> 1.0.
        assert_eq!(f32_to_f8e4m3(1.0625), 0x38);
        // 1.1875 is halfway between 1.125 (odd) and 1.25 (even) -> 1.25.
        assert_eq!(f8e4m3_to_f32(f32_to_f8e4m3(1.1875)), 1.25);
        assert!(f8e4m3_to_f32(f32_to_f8e4m3(f32::NAN)).is_nan());
    }

    #[test]
    fn encode_decode_roundtrip_bf16_f16() {
        let v = [1.0f32, -2.5, 3.140625, 0.0, 4096.0];
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let back = decode_to_f32(&encode_from_f32(&v, dt), dt);
            assert_eq!(back, v, "{dt}");
        }
    }
}
