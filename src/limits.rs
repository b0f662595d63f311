//! The limits every caller applies before any work (`generate`, `plan`, and servers): sizes,
//! steps, counts, prompt length, references. Each check gives a sentence naming the limit, so an
//! absurd request is an error up front, never an allocation failure or a run of hours.

use crate::error::{Error, Result};

/// The largest output side and area (16 MP: four times klein's 2048² maximum).
pub const MAX_SIDE: usize = 8192;
pub const MAX_PIXELS: usize = 4096 * 4096;
/// The most denoising steps a request may ask for.
pub const MAX_STEPS: usize = 1000;
/// The most images one request makes.
pub const MAX_COUNT: usize = 10_000;
/// Images in one DiT batch (`--batch`).
pub const MAX_BATCH: usize = 64;
/// Prompts beyond 512 tokens are truncated anyway; this bounds the tokenizer's work.
pub const MAX_PROMPT_BYTES: usize = 64 << 10;
/// Reference images per request (FLUX.2 is trained with up to 10).
pub const MAX_REFERENCES: usize = 10;
/// Reference images: smallest side, largest side before the area cap resizes them, aspect.
pub const REFERENCE_MIN_SIDE: usize = 64;
pub const REFERENCE_MAX_SIDE: usize = 16384;
pub const REFERENCE_MAX_ASPECT: f64 = 8.0;

/// Output size: both sides positive multiples of `multiple`, within [`MAX_SIDE`] and [`MAX_PIXELS`].
pub fn check_output_size(w: usize, h: usize, multiple: usize) -> Result<()> {
    let m = multiple;
    if w > MAX_SIDE || h > MAX_SIDE || w.saturating_mul(h) > MAX_PIXELS {
        return Err(Error::InvalidArgument(format!(
            "{w}x{h} is larger than flux2 generates: at most {MAX_SIDE} pixels a side and {} megapixels",
            MAX_PIXELS >> 20
        )));
    }
    if w == 0 || h == 0 || w % m != 0 || h % m != 0 {
        return Err(Error::InvalidArgument(format!(
            "width and height must be positive multiples of {m}; got {w}x{h} (nearest: {}x{})",
            (w / m).max(1) * m,
            (h / m).max(1) * m
        )));
    }
    Ok(())
}

pub fn check_steps(steps: usize) -> Result<()> {
    if steps == 0 || steps > MAX_STEPS {
        return Err(Error::InvalidArgument(format!("--steps must be between 1 and {MAX_STEPS}; got {steps}")));
    }
    Ok(())
}

pub fn check_count(count: usize) -> Result<()> {
    if count == 0 || count > MAX_COUNT {
        return Err(Error::InvalidArgument(format!("--count must be between 1 and {MAX_COUNT}; got {count}")));
    }
    Ok(())
}

pub fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 || batch > MAX_BATCH {
        return Err(Error::InvalidArgument(format!("--batch must be between 1 and {MAX_BATCH}; got {batch}")));
    }
    Ok(())
}

pub fn check_prompt(prompt: &str) -> Result<()> {
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the prompt is {} bytes; at most {MAX_PROMPT_BYTES} are accepted (the text encoder reads 512 tokens)",
            prompt.len()
        )));
    }
    Ok(())
}

pub fn check_reference_count(n: usize) -> Result<()> {
    if n > MAX_REFERENCES {
        return Err(Error::InvalidArgument(format!("{n} reference images; at most {MAX_REFERENCES} are supported")));
    }
    Ok(())
}

/// Reference image `index` (0-based) of `w`×`h` pixels.
pub fn check_reference(index: usize, w: usize, h: usize) -> Result<()> {
    let n = index + 1;
    if w < REFERENCE_MIN_SIDE || h < REFERENCE_MIN_SIDE {
        return Err(Error::InvalidArgument(format!(
            "reference image {n} is {w}x{h}; both sides must be at least {REFERENCE_MIN_SIDE} pixels"
        )));
    }
    if w > REFERENCE_MAX_SIDE || h > REFERENCE_MAX_SIDE {
        return Err(Error::InvalidArgument(format!(
            "reference image {n} is {w}x{h}; at most {REFERENCE_MAX_SIDE} pixels a side are accepted"
        )));
    }
    let aspect = (w as f64 / h as f64).max(h as f64 / w as f64);
    if aspect > REFERENCE_MAX_ASPECT {
        return Err(Error::InvalidArgument(format!(
            "reference image {n} is {w}x{h} (aspect {aspect:.1}:1); at most {REFERENCE_MAX_ASPECT}:1 is supported"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_the_absurd_and_accept_the_usual() {
        check_output_size(1024, 1024, 16).unwrap();
        for (w, h) in [(0, 64), (17, 64), (4_294_967_296, 64), (usize::MAX, usize::MAX), (8208, 16)] {
            assert!(check_output_size(w, h, 16).is_err(), "{w}x{h}");
        }
        assert!(check_steps(0).is_err() && check_steps(1001).is_err() && check_steps(4).is_ok());
        assert!(check_count(0).is_err() && check_count(10_001).is_err() && check_count(1).is_ok());
        assert!(check_prompt(&"x".repeat(MAX_PROMPT_BYTES + 1)).is_err() && check_prompt("a cat").is_ok());
        assert!(check_reference_count(11).is_err() && check_reference_count(10).is_ok());
        assert!(check_reference(0, 40, 80).is_err());
        assert!(check_reference(0, 64, 600).is_err());
        assert!(check_reference(0, 1 << 40, 1 << 40).is_err());
        check_reference(0, 6000, 4000).unwrap();
    }
}
