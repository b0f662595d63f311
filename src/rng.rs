//! Counter-based random numbers: value `i` of stream `key` is a pure function of (key, i), so
//! tensors can be generated in parallel chunks and reproduced exactly on any machine.

/// SplitMix64 finaliser: a strong 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stream key from a seed and a name (FNV-1a of the name, mixed with the seed).
pub fn stream_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
    }
    mix64(h ^ mix64(seed))
}

/// Uniform in [0, 1) with 24 random bits.
#[inline]
pub fn uniform(key: u64, i: u64) -> f32 {
    (mix64(key ^ mix64(i)) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Standard normal (Box–Muller on two counter-based uniforms).
#[inline]
pub fn normal(key: u64, i: u64) -> f32 {
    let bits = mix64(key ^ mix64(i));
    let u1 = ((bits >> 40) as f64 + 0.5) / (1u64 << 24) as f64;
    let u2 = ((bits & 0xFF_FFFF) as f64) / (1u64 << 24) as f64;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// `n` standard normal values of stream (seed, name), generated in parallel.
pub fn normal_vec(seed: u64, name: &str, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let key = stream_key(seed, name);
    (0..n as u64).into_par_iter().map(|i| normal(key, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_has_unit_moments_and_is_reproducible() {
        let v = normal_vec(7, "noise", 200_000);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert_eq!(v[..10], normal_vec(7, "noise", 10)[..]);
        assert_ne!(v[..10], normal_vec(8, "noise", 10)[..]);
    }

    #[test]
    fn uniform_is_in_range() {
        let key = stream_key(1, "u");
        let v: Vec<f32> = (0..10_000).map(|i| uniform(key, i)).collect();
        assert!(v.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 0.5).abs() < 0.02);
    }
}
