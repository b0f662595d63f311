//! Branch-free f32 approximations for the bf16 precision path (relative error below
//! 2e-7·(1 + |x|), the growth from rounding x·log₂e; far below bf16's 2⁻⁸), written so the loops over them vectorise; the f32 reference keeps libm.

/// eˣ for x ≤ 0 (a softmax's shifted scores, a sigmoid's e^-|v|): x·log₂e split into a nearest
/// integer n (by the 1.5·2²³ rounding trick) and f ∈ [-½, ½], 2ᶠ by its degree-6 Taylor
/// polynomial, 2ⁿ built in the exponent bits. Below -87 the result is e⁻⁸⁷, not 0.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let f = (t - n) * std::f32::consts::LN_2;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    let exponent = (shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32;
    p * f32::from_bits(exponent << 23)
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
        assert_eq!(silu(0.0), 0.0);
        assert!(silu(f32::NAN).is_nan(), "a NaN must stay visible to the health checks");
    }
}
