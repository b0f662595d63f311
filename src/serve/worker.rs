//! One worker thread per device, each owning a loaded pipeline, all taking jobs from one bounded
//! queue. A job streams its progress and images back to the HTTP handler over a channel; the
//! handler cancels it (a flag read after every denoising step) when its client goes away. A
//! failure, even a panic, fails the job and leaves the worker serving.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, GenParams};
use super::metrics::Metrics;
use crate::pipeline::{EncodedPrompt, Pipeline, Request, Residency, StepHook, StepProgress};
use crate::planner::{EncoderPrecision, TransformerPrecision};

/// What a job reports, in order: progress and images, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Progress {
        image: usize,
        step: usize,
        steps: usize,
    },
    /// A cheap preview of the image in progress (OpenAI's partial image).
    Partial {
        image: usize,
        step: usize,
        png: Vec<u8>,
    },
    Image(GeneratedImage),
    Done(JobTimings),
    Failed(ApiError),
}

#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub index: usize,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub png: Vec<u8>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JobTimings {
    pub queue_s: f64,
    pub encode_s: f64,
    pub references_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
    pub total_s: f64,
    /// The worker's device.
    pub device: usize,
    /// Peak device memory of the engine's tensors, where the backend tracks it.
    pub peak_memory_mb: Option<f64>,
}

pub struct Job {
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
    pub enqueued: Instant,
}

/// State the workers and the HTTP side share.
#[derive(Default)]
pub struct Shared {
    pub shutting_down: AtomicBool,
    pub running: AtomicUsize,
    pub metrics: Metrics,
}

/// How a worker plans memory per request (the memory plan of `flux2 plan`, per request size).
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub budget: Option<usize>,
    /// Whose sizes the plan counts (the CPU stores f32 activations).
    pub target: crate::planner::Target,
    pub transformer_precision: TransformerPrecision,
    pub encoder_precision: EncoderPrecision,
}

pub struct Worker {
    pub device: usize,
    pub pipeline: Pipeline,
    pub plan: PlanSettings,
    /// The last prompt encoded (prompt, negative) and its embeddings: repeated prompts skip the encoder.
    last_prompt: Option<(String, Option<String>, EncodedPrompt)>,
}

impl Worker {
    pub fn new(device: usize, pipeline: Pipeline, plan: PlanSettings) -> Worker {
        Worker { device, pipeline, plan, last_prompt: None }
    }

    /// Take jobs until the queue closes.
    pub fn run(mut self, queue: crossbeam_channel::Receiver<Job>, shared: Arc<Shared>) {
        for job in queue.iter() {
            if job.cancel.load(Ordering::Relaxed) {
                continue; // the client left while it waited
            }
            if shared.shutting_down.load(Ordering::Relaxed) {
                let _ = job.events.send(Event::Failed(ApiError::shutting_down()));
                continue;
            }
            shared.running.fetch_add(1, Ordering::Relaxed);
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_job(&job, &shared.metrics)));
            shared.running.fetch_sub(1, Ordering::Relaxed);
            let event = match outcome {
                Ok(Ok(timings)) => Event::Done(timings),
                Ok(Err(crate::Error::Cancelled)) => {
                    tracing::info!("request cancelled: its client went away");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!("request failed: {e}");
                    Event::Failed(ApiError::from_engine(&e))
                }
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    tracing::error!("request panicked: {what}; the worker keeps serving");
                    // Whatever the run left loaded may be half-built: reload on next use.
                    self.last_prompt = None;
                    Event::Failed(ApiError::server(format!("internal error: {what}")))
                }
            };
            let _ = job.events.send(event);
        }
    }

    fn run_job(&mut self, job: &Job, metrics: &Metrics) -> crate::Result<JobTimings> {
        let p = &job.params;
        let start = Instant::now();
        let mut t =
            JobTimings { queue_s: (start - job.enqueued).as_secs_f64(), device: self.device, ..Default::default() };
        metrics.observe("queue", start - job.enqueued);
        self.follow_plan(p)?;

        let cfg = self.pipeline.info.uses_cfg(p.guidance);
        let negative = cfg.then(|| p.negative_prompt.clone().unwrap_or_default());
        let encode_start = Instant::now();
        let encoded = match &self.last_prompt {
            Some((prompt, neg, e)) if *prompt == p.prompt && *neg == negative => e.clone(),
            _ => {
                let e = self.pipeline.encode_with_negative(&p.prompt, negative.as_deref())?;
                self.last_prompt = Some((p.prompt.clone(), negative.clone(), e.clone()));
                e
            }
        };
        t.encode_s = encode_start.elapsed().as_secs_f64();
        metrics.observe("encode", encode_start.elapsed());

        let refs_start = Instant::now();
        let refs = self.pipeline.prepare_references(&p.references)?;
        t.references_s = refs_start.elapsed().as_secs_f64();

        for (index, &seed) in p.seeds.iter().enumerate() {
            let (events, cancel) = (job.events.clone(), job.cancel.clone());
            let hook = StepHook(Arc::new(move |p: &StepProgress| {
                let _ = events.send(Event::Progress { image: index, step: p.step, steps: p.steps });
                if let Some(png) = p.preview.and_then(|img| img.png_bytes(&[]).ok()) {
                    let _ = events.send(Event::Partial { image: index, step: p.step, png });
                }
                !cancel.load(Ordering::Relaxed)
            }));
            let request = Request {
                prompt: p.prompt.clone(),
                width: p.width,
                height: p.height,
                steps: p.steps,
                guidance: p.guidance,
                seed,
                on_step: Some(hook),
                init_image: p.inpaint.as_ref().map(|i| i.image.clone()),
                mask: p.inpaint.as_ref().map(|i| i.mask.clone()),
                strength: p.inpaint.as_ref().map(|i| i.strength),
                preview_every: p.preview_every,
                ..Default::default()
            };
            let out = self.pipeline.generate(&request, Some(&encoded), refs.as_ref())?;
            t.denoise_s += out.timings.denoise.as_secs_f64();
            t.decode_s += out.timings.decode.as_secs_f64();
            metrics.observe("denoise", out.timings.denoise);
            metrics.observe("decode", out.timings.decode);
            let params = format!(
                "{}\nSteps: {}, Sampler: Euler (flow matching), CFG scale: {}, Seed: {seed}, Size: {}x{}",
                p.prompt, out.steps, out.guidance, out.image.width, out.image.height
            );
            let png = out.image.png_bytes(&[("parameters", params)])?;
            metrics.count_image();
            let image = GeneratedImage { index, seed, width: out.image.width, height: out.image.height, png };
            if job.events.send(Event::Image(image)).is_err() {
                return Err(crate::Error::Cancelled);
            }
        }
        t.total_s = start.elapsed().as_secs_f64();
        t.peak_memory_mb = crate::device::memory(self.pipeline.backend()).map(|(_, peak)| peak as f64 / 1048576.0);
        metrics.observe("total", start.elapsed() + Duration::from_secs_f64(t.queue_s));
        Ok(t)
    }

    /// With a memory budget, plan this request's size and follow the plan (evictions, tiling).
    fn follow_plan(&mut self, p: &GenParams) -> crate::Result<()> {
        let Some(budget) = self.plan.budget else { return Ok(()) };
        let spec = crate::synth::PipelineSpec::from_info(&self.pipeline.info)?;
        let m = spec.vae.pixel_multiple();
        let refs: Vec<(usize, usize)> =
            p.references.iter().map(|r| crate::pipeline::reference_size(r.width, r.height, m)).collect();
        // The output defaults to the image being edited, else to the first reference.
        let first = match &p.inpaint {
            Some(i) => Some(crate::inpaint::init_size(i.image.width, i.image.height, m)),
            None => refs.first().copied(),
        };
        let (width, height) = crate::pipeline::output_size(p.width, p.height, first, None, m)?;
        let input = crate::planner::PlanInput {
            cfg: self.pipeline.info.uses_cfg(p.guidance),
            transformer: spec.transformer,
            text_encoder: spec.text_encoder,
            vae: spec.vae,
            transformer_precision: self.plan.transformer_precision,
            encoder_precision: self.plan.encoder_precision,
            width,
            height,
            references: refs,
            budget,
            stored_blocks: spec.stored_blocks,
            stored_fp8: spec.stored_fp8,
            batch: 1,
            kv_cache: false,
        };
        let plan = crate::planner::plan_for(&input, self.plan.target)?;
        self.pipeline.set_residency(Residency::from_plan(&plan));
        Ok(())
    }
}
