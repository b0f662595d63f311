//! Branch-free f32 approximations for the bf16 precision path, written so the loops over them
//! vectorise (relative error below 2e-7·(1 + |x|), the growth from rounding x·log₂e; far below
//! bf16's 2⁻⁸); the f32 reference keeps libm.

/// 1.5 · 2²³: adding it rounds to the nearest integer and leaves that integer in the low bits.
const ROUND: f32 = 12_582_912.0;
/// 2ᶠ = e^(f·ln 2) by Taylor's degree-6 polynomial in f·ln 2, highest coefficient first (Horner).
const TAYLOR: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// eˣ for x ≤ 0 (a softmax's shifted scores, a sigmoid's e^-|v|): x·log₂e split into a nearest
/// integer n (by the `ROUND` trick) and f ∈ [-½, ½], 2ᶠ by `TAYLOR`, 2ⁿ built in the exponent
/// bits. Below -87 the result is e⁻⁸⁷, not 0.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    // Not f32::max: a NaN must stay NaN (the health checks look for it).
    let t = if x < -87.0 { -87.0 } else { x } * std::f32::consts::LOG2_E;
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let f = (t - n) * std::f32::consts::LN_2;
    let p = TAYLOR[1..].iter().fold(TAYLOR[0], |p, &c| p * f + c);
    let exponent = (shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32;
    p * f32::from_bits(exponent << 23)
}

/// `exp_nonpositive` in 16 lanes.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_nonpositive_x16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // maxps returns its second operand when either is NaN: NaN stays NaN.
    let t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-87.0), x), _mm512_set1_ps(std::f32::consts::LOG2_E));
    let shifted = _mm512_add_ps(t, _mm512_set1_ps(ROUND));
    let n = _mm512_sub_ps(shifted, _mm512_set1_ps(ROUND));
    let f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(std::f32::consts::LN_2));
    let mut p = _mm512_set1_ps(TAYLOR[0]);
    for &c in &TAYLOR[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    let bias = _mm512_set1_epi32(127 - ROUND.to_bits() as i32);
    let exponent = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_castps_si512(shifted), bias));
    _mm512_mul_ps(p, _mm512_castsi512_ps(exponent))
}

/// v·σ(v), with σ from e^-|v| so the exponential never overflows.
#[inline(always)]
pub(super) fn silu(v: f32) -> f32 {
    let e = exp_nonpositive(-v.abs());
    let numerator = if v >= 0.0 { v } else { v * e };
    numerator / (1.0 + e)
}

/// Runs `f` compiled for AVX-512 where the CPU has it, so the loops it inlines vectorise 16 wide;
/// as it is elsewhere.
#[inline(always)]
pub(super) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was just detected.
        return unsafe { avx512(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_exp_and_silu_track_libm() {
        for i in -20_000..=20_000 {
            let v = i as f32 * 1e-3 * 9.0; // -180 .. 180
            let silu_ref = (v as f64) / (1.0 + (-(v as f64)).exp());
            let err = (silu(v) as f64 - silu_ref).abs();
            // Below v ≈ -87 the clamped exp leaves |silu| < 1e-34 instead of a smaller number.
            assert!(
                err <= 2e-7 * (1.0 + v.abs() as f64) * silu_ref.abs() + 1e-34,
                "silu({v}) = {} vs {silu_ref}",
                silu(v)
            );
            // Near -87 the result nears f32's subnormals, where relative precision runs out.
            if (-80.0..=0.0).contains(&v) {
                let exp_ref = (v as f64).exp();
                let rel = (exp_nonpositive(v) as f64 - exp_ref).abs() / exp_ref;
                assert!(rel <= 2e-7 * (1.0 + v.abs() as f64), "exp({v}) relative error {rel}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            for i in -2_000..=0 {
                let v = i as f32 * 0.05 + 0.01 * (i % 7) as f32;
                let mut lanes = [0f32; 16];
                // SAFETY: AVX-512 F was just detected.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(lanes.as_mut_ptr(), exp_nonpositive_x16(_mm512_set1_ps(v)));
                }
                // The same polynomial, with fused multiply-adds: within an ulp or two.
                let scalar = exp_nonpositive(v);
                assert!((lanes[0] - scalar).abs() <= 4.0 * f32::EPSILON * scalar, "16-lane exp({v})");
            }
        }
        assert_eq!(silu(0.0), 0.0);
        assert!(silu(f32::NAN).is_nan(), "a NaN must stay visible to the health checks");
    }
}
