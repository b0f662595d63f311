//! The numerical health check of a generation: the pipeline records NaN/±inf in the text
//! embeddings, the reference latents, the latents after every denoising step and the decoded
//! image on the device (`Backend::record_nonfinite`), and reads the result once per stage, so a
//! broken weight, noise file or overflow stops the run with a sentence instead of a black PNG.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One checked tensor. Ids grow in running order, so the smallest recorded id is the first
/// place a non-finite value appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    PromptEmbeddings,
    NegativeEmbeddings,
    ReferenceLatents,
    /// The latents after denoising step `i` (0-based).
    Step(usize),
    DecodedImage,
}

const STEP_BASE: u32 = 16;
const DECODED_IMAGE: u32 = u32::MAX - 1;

impl Check {
    pub fn id(self) -> u32 {
        match self {
            Check::PromptEmbeddings => 0,
            Check::NegativeEmbeddings => 1,
            Check::ReferenceLatents => 2,
            Check::Step(i) => STEP_BASE.saturating_add(u32::try_from(i).unwrap_or(u32::MAX)).min(DECODED_IMAGE - 1),
            Check::DecodedImage => DECODED_IMAGE,
        }
    }

    pub fn from_id(id: u32) -> Option<Check> {
        Some(match id {
            0 => Check::PromptEmbeddings,
            1 => Check::NegativeEmbeddings,
            2 => Check::ReferenceLatents,
            DECODED_IMAGE => Check::DecodedImage,
            i if i >= STEP_BASE => Check::Step((i - STEP_BASE) as usize),
            _ => return None,
        })
    }

    /// Where the value was found, e.g. "the latents after denoising step 3 of 4".
    pub fn describe(self, steps: usize) -> String {
        match self {
            Check::PromptEmbeddings => "the prompt's text embeddings".into(),
            Check::NegativeEmbeddings => "the negative (empty) prompt's text embeddings".into(),
            Check::ReferenceLatents => "the reference images' latents".into(),
            Check::Step(i) => format!("the latents after denoising step {} of {steps}", i + 1),
            Check::DecodedImage => "the decoded image".into(),
        }
    }
}

/// Queue the check of `x` (no host synchronisation).
pub fn record(be: &dyn Backend, x: &Tensor, check: Check) -> Result<()> {
    be.record_nonfinite(x, check.id())
}

/// Read the checks queued since the last call: an error naming the first failing one, if any.
pub fn verify(be: &dyn Backend, steps: usize) -> Result<()> {
    match be.take_nonfinite()? {
        None => Ok(()),
        Some(id) => {
            let place = Check::from_id(id).map_or_else(|| format!("check {id}"), |c| c.describe(steps));
            Err(Error::NonFinite(format!(
                "NaN or inf in {place}; stopped without writing an image. A weight, the --noise file or a \
                 config value may hold NaN or inf, or a value overflowed; rerun with --debug-nans to find \
                 the first operation that produced it"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_run_in_stage_order_and_round_trip() {
        let order = [
            Check::PromptEmbeddings,
            Check::NegativeEmbeddings,
            Check::ReferenceLatents,
            Check::Step(0),
            Check::Step(999),
            Check::DecodedImage,
        ];
        for pair in order.windows(2) {
            assert!(pair[0].id() < pair[1].id(), "{pair:?}");
        }
        for c in order {
            assert_eq!(Check::from_id(c.id()), Some(c));
        }
        assert_eq!(Check::Step(2).describe(4), "the latents after denoising step 3 of 4");
    }
}
