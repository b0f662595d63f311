//! The denoising step recorded once and replayed (CUDA graphs): the plain step, or the KV scheme's
//! cached step. What changes from step to step (the latent tokens, the timestep, the guidance) is
//! an input of the recording, written into its buffers before each replay; the text context, the
//! reference K/V cache, the RoPE tables and the weights are read where they lie, so the recording
//! borrows the model, the context and the cache, and keeps the tables it read.

use super::{Flux2Transformer, KvStep, RefKvCache};
use crate::backend::Captured;
use crate::error::{Error, Result};
use crate::model::rope::PositionIds;
use crate::tensor::Tensor;

/// A recorded forward (plain, or the KV scheme's cached one) for one shape of latent tokens, context and ids.
pub struct StepGraph<'a> {
    model: &'a Flux2Transformer,
    recording: Box<dyn Captured>,
    /// The RoPE tables the recording reads: alive while it may replay, whatever the model's
    /// table cache holds by then.
    _rope: (Tensor, Tensor),
    _context: &'a Tensor,
    _cache: Option<&'a RefKvCache>,
}

impl Flux2Transformer {
    /// Record [`Flux2Transformer::forward`] (or, with a `cache`, `forward_kv_cached`) for latent
    /// tokens shaped like `hidden_states` with this `context` and these ids (and a guidance value
    /// per sample when `guidance`; not with a cache). None where the backend does not record or
    /// blocks are streamed (their per-step upload cannot be recorded). Run the same forward once
    /// eagerly first: it sizes the workspaces a recording must find.
    #[allow(clippy::too_many_arguments)]
    pub fn capture_step<'a>(
        &'a self,
        hidden_states: &Tensor,
        context: &'a Tensor,
        img_ids: &PositionIds,
        txt_ids: &PositionIds,
        cache: Option<&'a RefKvCache>,
        guidance: bool,
    ) -> Result<Option<StepGraph<'a>>> {
        if self.double.iter().any(Option::is_none) || self.single.iter().any(Option::is_none) {
            return Ok(None);
        }
        if let Some(c) = cache {
            self.check_cache(c)?;
            if guidance {
                return Err(Error::InvalidArgument("the KV scheme's cached step takes no guidance".into()));
            }
        }
        let batch = hidden_states.dim(0);
        let zeros = vec![0.0; batch];
        self.check_inputs(hidden_states, context, (batch, guidance.then_some(batch)), img_ids, txt_ids)?;
        // Uploaded (or found) now: an upload inside the recording would end it.
        let rope = self.rope_tables(txt_ids, img_ids)?;
        let times = self.device_times(&zeros)?;
        let guidance_times = guidance.then(|| self.device_times(&zeros)).transpose()?;
        let mut inputs = vec![hidden_states, &times];
        inputs.extend(guidance_times.as_ref());
        let out_shape = [batch, hidden_states.dim(1), self.cfg.out_features()];
        let be = &*self.be;
        let mut work = |bufs: &[Tensor]| {
            let step = cache.map_or(KvStep::Plain, KvStep::Cached);
            let (out, _) = self.forward_kv(&bufs[0], context, &bufs[1], img_ids, txt_ids, bufs.get(2), step)?;
            Ok(out)
        };
        let Some(recording) = be.capture(&inputs, (&out_shape, be.activation_dtype()), &mut work)? else {
            return Ok(None);
        };
        Ok(Some(StepGraph { model: self, recording, _rope: rope, _context: context, _cache: cache }))
    }
}

impl StepGraph<'_> {
    /// The recorded forward on new latent tokens, timesteps and guidance; shapes (and guidance or
    /// none) other than the recorded ones are the replay's shape errors.
    pub fn forward(&self, hidden_states: &Tensor, timestep: &[f32], guidance: Option<&[f32]>) -> Result<Tensor> {
        let times = self.model.device_times(timestep)?;
        let guidance_times = guidance.map(|g| self.model.device_times(g)).transpose()?;
        let mut inputs = vec![hidden_states, &times];
        inputs.extend(guidance_times.as_ref());
        self.recording.replay(&inputs)
    }
}

/// The forward of one generation's denoising steps (plain, or the KV scheme's cached steps),
/// replayed from a recording where the backend records: the first step runs eagerly (it sizes the
/// backend's workspaces and uploads the RoPE tables, which a recording must find ready), the
/// second is recorded, the later ones replay it. A recording that fails is reported once and the
/// steps go on eagerly.
pub struct Steps<'a> {
    model: &'a Flux2Transformer,
    context: &'a Tensor,
    img_ids: &'a PositionIds,
    txt_ids: &'a PositionIds,
    cache: Option<&'a RefKvCache>,
    state: StepsState<'a>,
}

enum StepsState<'a> {
    First,
    Record,
    Replay(StepGraph<'a>),
    Eager,
}

impl<'a> Steps<'a> {
    /// `cache`: the KV scheme's cached steps (`forward_kv_cached`); `record`: false runs every
    /// step eagerly.
    pub fn new(
        model: &'a Flux2Transformer,
        context: &'a Tensor,
        img_ids: &'a PositionIds,
        txt_ids: &'a PositionIds,
        cache: Option<&'a RefKvCache>,
        record: bool,
    ) -> Steps<'a> {
        let state = if record { StepsState::First } else { StepsState::Eager };
        Steps { model, context, img_ids, txt_ids, cache, state }
    }

    /// Whether the steps run from a recording now.
    pub fn replaying(&self) -> bool {
        matches!(self.state, StepsState::Replay(_))
    }

    pub fn forward(&mut self, hidden_states: &Tensor, timestep: &[f32], guidance: Option<&[f32]>) -> Result<Tensor> {
        let (model, context, img_ids, txt_ids, cache) =
            (self.model, self.context, self.img_ids, self.txt_ids, self.cache);
        if let StepsState::Record = self.state {
            self.state = match model.capture_step(hidden_states, context, img_ids, txt_ids, cache, guidance.is_some()) {
                Ok(Some(graph)) => {
                    tracing::debug!("denoising step recorded as a graph");
                    StepsState::Replay(graph)
                }
                Ok(None) => StepsState::Eager,
                Err(e) => {
                    tracing::warn!("recording the denoising step failed ({e}); the steps run without a graph");
                    StepsState::Eager
                }
            };
        }
        match &self.state {
            StepsState::Replay(graph) => graph.forward(hidden_states, timestep, guidance),
            StepsState::First | StepsState::Record | StepsState::Eager => {
                if let StepsState::First = self.state {
                    self.state = StepsState::Record;
                }
                match cache {
                    Some(c) if guidance.is_none() => {
                        model.forward_kv_cached(hidden_states, context, timestep, img_ids, txt_ids, c)
                    }
                    Some(_) => Err(Error::InvalidArgument("the KV scheme's cached step takes no guidance".into())),
                    None => model.forward(hidden_states, context, timestep, img_ids, txt_ids, guidance),
                }
            }
        }
    }
}
