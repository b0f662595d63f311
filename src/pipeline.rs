//! The klein pipeline (diffusers' `Flux2KleinPipeline`, spec §7): prompt encoding, reference
//! images, noise, the Euler loop with optional CFG, VAE decode, pixels.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::health::{self, Check};
use crate::image_io::RgbImage;
use crate::model::qwen3::{Qwen3TextEncoder, KLEIN_OUT_LAYERS};
use crate::model::rope::PositionIds;
use crate::model::tokenizer::{PromptTokenizer, MAX_TOKENS, PROMPT_PREFIX, PROMPT_SUFFIX};
use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::{Compute, Flux2Transformer, Steps};
use crate::model::vae::{pack, unpack, Vae, VaeParts};
use crate::planner::EncoderPrecision;
use crate::progress::Stage;
use crate::prompt_cache::PromptCache;
use crate::sampler::{Schedule, SchedulerConfig, TimestepMode};
use crate::tensor::Tensor;

/// diffusers' `default_sample_size · vae_scale_factor`.
pub const DEFAULT_SIZE: usize = 1024;
/// References above this many pixels are resized down to it (Lanczos).
pub const REFERENCE_MAX_AREA: usize = 1024 * 1024;
pub use crate::limits::{MAX_PIXELS, MAX_SIDE, MAX_STEPS, REFERENCE_MAX_ASPECT, REFERENCE_MIN_SIDE};

/// What `model_index.json` says about the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineInfo {
    /// The diffusers pipeline folder, when the model is one (None when given as separate files).
    pub root: Option<PathBuf>,
    /// Each component's folder or file.
    pub transformer: PathBuf,
    pub text_encoder: PathBuf,
    pub vae: PathBuf,
    /// The tokenizer folder; None: the Qwen3 tokenizer built into the binary.
    pub tokenizer: Option<PathBuf>,
    /// Step- and guidance-distilled (`"is_distilled": true`); base models use real CFG.
    pub is_distilled: bool,
    /// The KV variant (`"_class_name": "Flux2KleinKVPipeline"`, e.g. FLUX.2-klein-9b-kv): reference
    /// tokens' K/V are computed at the first step and reused (distilled, no CFG).
    pub kv: bool,
}

/// Component files that replace a pipeline folder's own (`--transformer`, `--text-encoder`,
/// `--vae`), or make up the whole model when no folder is given.
#[derive(Debug, Clone, Default)]
pub struct ComponentFiles {
    pub transformer: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub vae: Option<PathBuf>,
}

impl PipelineInfo {
    pub fn read(root: &Path) -> Result<PipelineInfo> {
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::config(root, "not a diffusers pipeline folder: model_index.json is missing"));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&index, format!("not valid JSON: {e}")))?;
        for component in ["tokenizer", "text_encoder", "transformer", "vae"] {
            if !root.join(component).is_dir() {
                return Err(Error::config(root, format!("the pipeline has no `{component}/` folder")));
            }
        }
        // diffusers marks the KV variant only by its pipeline class (its transformer config is the
        // plain one), and that class does not store `is_distilled` (it is always distilled).
        let kv = json.get("_class_name").and_then(|v| v.as_str()) == Some("Flux2KleinKVPipeline");
        Ok(PipelineInfo {
            root: Some(root.to_path_buf()),
            transformer: root.join("transformer"),
            text_encoder: root.join("text_encoder"),
            vae: root.join("vae"),
            tokenizer: Some(root.join("tokenizer")),
            is_distilled: json.get("is_distilled").and_then(|v| v.as_bool()).unwrap_or(kv),
            kv,
        })
    }

    /// A pipeline folder with some components replaced by files, or (with no folder) the three
    /// files alone. Without a folder's model_index.json the variant is read off the transformer's
    /// file name: "base" means a base model (CFG, 50 steps), "kv" the KV variant; otherwise it is
    /// taken as distilled, and the log says so.
    pub fn assemble(model: Option<&Path>, files: &ComponentFiles) -> Result<PipelineInfo> {
        for (flag, path) in
            [("--transformer", &files.transformer), ("--text-encoder", &files.text_encoder), ("--vae", &files.vae)]
        {
            if let Some(p) = path {
                if !p.exists() {
                    return Err(Error::InvalidArgument(format!("{flag} {}: no such file or folder", p.display())));
                }
            }
        }
        let mut info = match model {
            Some(root) => PipelineInfo::read(root)?,
            None => {
                let (Some(t), Some(te), Some(v)) = (&files.transformer, &files.text_encoder, &files.vae) else {
                    return Err(Error::InvalidArgument(
                        "give --model (a diffusers folder), or all three of --transformer, --text-encoder and --vae"
                            .into(),
                    ));
                };
                let name = t.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
                let words: Vec<&str> = name.split(|c: char| !c.is_ascii_alphanumeric()).collect();
                let (base, kv) = (words.contains(&"base"), words.contains(&"kv"));
                tracing::info!(
                    "{}: taken as a {} model from its file name (no model_index.json)",
                    t.display(),
                    if kv {
                        "KV"
                    } else if base {
                        "base (CFG)"
                    } else {
                        "distilled"
                    }
                );
                PipelineInfo {
                    root: None,
                    transformer: t.clone(),
                    text_encoder: te.clone(),
                    vae: v.clone(),
                    tokenizer: None,
                    is_distilled: !base,
                    kv,
                }
            }
        };
        if let Some(p) = &files.transformer {
            info.transformer = p.clone();
        }
        if let Some(p) = &files.text_encoder {
            info.text_encoder = p.clone();
        }
        if let Some(p) = &files.vae {
            info.vae = p.clone();
        }
        Ok(info)
    }

    /// What to name in messages about the model as a whole.
    pub fn origin(&self) -> &Path {
        self.root.as_deref().unwrap_or(&self.transformer)
    }

    /// Default steps and guidance: 4 / 1.0 distilled, 50 / 4.0 base.
    pub fn defaults(&self) -> (usize, f32) {
        if self.is_distilled {
            (4, 1.0)
        } else {
            (50, 4.0)
        }
    }

    /// Whether a run with this guidance (None: the default) uses real CFG: base models only.
    pub fn uses_cfg(&self, guidance: Option<f32>) -> bool {
        !self.is_distilled && guidance.unwrap_or(self.defaults().1) > 1.0
    }
}

/// A reference image's size after the area cap (the Lanczos resize target).
fn capped_reference_size(w: usize, h: usize) -> (usize, usize) {
    if w * h <= REFERENCE_MAX_AREA {
        return (w, h);
    }
    let scale = (REFERENCE_MAX_AREA as f64 / (w * h) as f64).sqrt();
    ((w as f64 * scale) as usize, (h as f64 * scale) as usize)
}

/// The size a `w`×`h` reference is encoded at: area-capped, then centre-cropped to `multiple`.
pub fn reference_size(w: usize, h: usize, multiple: usize) -> (usize, usize) {
    let (w, h) = capped_reference_size(w, h);
    ((w / multiple) * multiple, (h / multiple) * multiple)
}

/// The output size: explicit, else the first reference's, else the noise's, else 1024²; both
/// sides positive multiples of `multiple`.
pub fn output_size(
    width: Option<usize>,
    height: Option<usize>,
    first_reference: Option<(usize, usize)>,
    noise: Option<&Tensor>,
    multiple: usize,
) -> Result<(usize, usize)> {
    let m = multiple;
    let from_noise = noise.filter(|n| n.rank() == 4).map(|n| (n.dim(3) * m, n.dim(2) * m));
    let fallback = first_reference.or(from_noise).unwrap_or((DEFAULT_SIZE, DEFAULT_SIZE));
    let (w, h) = (width.unwrap_or(fallback.0), height.unwrap_or(fallback.1));
    crate::limits::check_output_size(w, h, m)?;
    Ok((w, h))
}

pub struct Pipeline {
    be: Arc<dyn Backend>,
    options: LoadOptions,
    pub info: PipelineInfo,
    pub tokenizer: PromptTokenizer,
    /// Loaded on first use; evicted after encoding when the residency plan says so.
    text_encoder: Mutex<Option<Arc<Qwen3TextEncoder>>>,
    /// Loaded on first use; evicted before VAE decode when the residency plan says so.
    transformer: Mutex<Option<Arc<Flux2Transformer>>>,
    pub transformer_config: TransformerConfig,
    /// The VAE decoder (and the latent statistics).
    pub vae: Vae,
    /// The VAE encoder, loaded when references first need it (text-to-image never loads it).
    vae_encoder: Mutex<Option<Arc<Vae>>>,
    pub scheduler: SchedulerConfig,
    prompt_cache: Option<PromptCache>,
    /// NVML, when present and the backend is a GPU.
    telemetry: Option<crate::telemetry::Telemetry>,
    /// Synchronise after every denoising step (benchmarks' per-step times).
    step_sync: bool,
    /// The latent-to-RGB preview projection, fitted to the VAE on first use.
    latent_rgb: Mutex<Option<Arc<crate::preview::LatentToRgb>>>,
    /// Every component load so far: (component, seconds), in order.
    load_log: Mutex<Vec<(&'static str, f64)>>,
}

/// Run one component load with a progress spinner and a log line, and time it.
fn timed_load<T>(name: &'static str, load: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let stage = crate::progress::Stage::spinner("load");
    stage.message(name.to_string());
    let loaded = load();
    let seconds = stage.finish().as_secs_f64();
    let loaded = loaded?;
    tracing::info!("{name} loaded in {seconds:.2}s");
    Ok((loaded, seconds))
}

/// One generation request. Sizes and steps left `None` take the pipeline defaults.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub prompt: String,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub seed: u64,
    /// Initial latents `[1, 4z, H/16, W/16]` (diffusers' `latents=`); from `seed` when absent.
    pub noise: Option<Tensor>,
    pub timestep_mode: Option<TimestepMode>,
    /// Called after every denoising step; returning false cancels the run (`Error::Cancelled`).
    pub on_step: Option<StepHook>,
    /// Inpainting / img2img (diffusers' `Flux2KleinInpaintPipeline`): the image to start from.
    /// With it, `noise` is the tensor blended into its latents at the starting sigma.
    pub init_image: Option<RgbImage>,
    /// How far from the init image to start, in (0, 1] (default 0.8, diffusers' default).
    pub strength: Option<f64>,
    /// White pixels are repainted, black kept (same size as the init image); none: img2img.
    pub mask: Option<RgbImage>,
    /// diffusers' `padding_mask_crop`: work on the region around the mask, padded by this many
    /// pixels, and paste the result back into the init image.
    pub mask_crop: Option<usize>,
    /// Reference K/V computed once and reused (`Flux2KleinKVPipeline`'s scheme) on any klein model;
    /// KV-variant models always do this. Needs references.
    pub kv_cache: bool,
    /// Every this many steps, a cheap preview of the current x₀ estimate (`Output::previews`).
    pub preview_every: Option<usize>,
}

/// What a step hook sees after each denoising step.
pub struct StepProgress<'a> {
    /// The step just finished, 1-based, of `steps`.
    pub step: usize,
    pub steps: usize,
    /// The preview made at this step, if `preview_every` asked for one (the first image's).
    pub preview: Option<&'a RgbImage>,
}

/// A per-step callback; returning false cancels the run.
#[derive(Clone)]
pub struct StepHook(pub Arc<dyn Fn(&StepProgress) -> bool + Send + Sync>);

impl std::fmt::Debug for StepHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepHook")
    }
}

impl Request {
    /// The checks that need no model: finite guidance and noise, steps in range. Run before
    /// loading anything, and again by `generate`.
    pub fn validate(&self) -> Result<()> {
        if let Some(steps) = self.steps {
            crate::limits::check_steps(steps)?;
        }
        crate::limits::check_prompt(&self.prompt)?;
        if let Some(strength) = self.strength {
            crate::inpaint::check_strength(strength)?;
        }
        if self.preview_every == Some(0) {
            return Err(Error::InvalidArgument("--preview-every must be at least 1 (a preview every K steps)".into()));
        }
        if self.init_image.is_none() {
            for (set, flag) in [
                (self.strength.is_some(), "--strength"),
                (self.mask.is_some(), "--mask"),
                (self.mask_crop.is_some(), "--mask-crop"),
            ] {
                if set {
                    return Err(Error::InvalidArgument(format!("{flag} needs --init-image")));
                }
            }
        }
        if self.mask_crop.is_some() && self.mask.is_none() {
            return Err(Error::InvalidArgument("--mask-crop needs --mask (it crops around the masked region)".into()));
        }
        if let (Some(init), Some(mask)) = (&self.init_image, &self.mask) {
            if (mask.width, mask.height) != (init.width, init.height) {
                return Err(Error::InvalidArgument(format!(
                    "--mask is {}x{} but --init-image is {}x{}; they must be the same size",
                    mask.width, mask.height, init.width, init.height
                )));
            }
        }
        if let Some(g) = self.guidance.filter(|g| !g.is_finite()) {
            return Err(Error::InvalidArgument(format!("--guidance must be a finite number; got {g}")));
        }
        if let Some(noise) = &self.noise {
            let values = noise.to_vec_f32()?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "the --noise tensor holds {} at element {i}; it must be finite",
                    values[i]
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
    /// Each denoising step (host time; device-accurate only when `steps_synchronized`).
    pub steps: Vec<Duration>,
    /// Synchronise the device after every step (set through `Pipeline::set_step_sync` by
    /// benchmarks), so `steps` are device times.
    pub steps_synchronized: bool,
    /// Steps that ran from a recorded CUDA graph (0 where steps are not recorded).
    pub replayed_steps: usize,
}

pub struct Output {
    pub image: RgbImage,
    /// Final latents before decoding, `[1, 4z, H/16, W/16]` (normalised space).
    pub latents: Tensor,
    /// The decoder's output `[1, 3, H, W]` (about [-1, 1]) before quantisation to 8 bits.
    pub pixels: Tensor,
    pub steps: usize,
    pub guidance: f32,
    pub timings: Timings,
    /// NVML readings at the end of each stage (empty without NVML).
    pub telemetry: Vec<(&'static str, crate::telemetry::Sample)>,
    /// (step, preview of the x₀ estimate after it) for `Request::preview_every`; 1/8 of the
    /// image's size (one pixel per VAE latent).
    pub previews: Vec<(usize, RgbImage)>,
}

/// Encoded prompt (and the empty negative prompt for CFG), reusable across seeds.
#[derive(Clone)]
pub struct EncodedPrompt {
    pub prompt: String,
    pub context: Tensor,
    pub negative: Option<Tensor>,
}

/// Prepared reference images: packed tokens and their ids.
pub struct References {
    pub tokens: Tensor,
    pub ids: PositionIds,
    /// Size of the first reference after cropping (the default output size).
    pub first_size: (usize, usize),
    /// Each reference's latent grid (rows, columns).
    pub grids: Vec<(usize, usize)>,
}

impl References {
    /// The ids with the first reference at time `t0` (then `t0 + 10`, ...): 10 in the editing
    /// pipeline, 20 in the inpainting one (where the init image is the first condition).
    pub fn ids_from(&self, t0: f32) -> Result<PositionIds> {
        let parts: Vec<PositionIds> =
            self.grids.iter().enumerate().map(|(i, &(h, w))| PositionIds::image(t0 + 10.0 * i as f32, h, w)).collect();
        PositionIds::concat(&parts.iter().collect::<Vec<_>>())
    }
}

/// The init image, mask and crop of an inpainting / img2img request, as the reference
/// preprocesses them.
pub struct PreparedInit {
    /// The model's input image at the output size.
    pub image: RgbImage,
    /// The binarised mask at the output size, one value per pixel (None: img2img).
    pub mask: Option<Vec<f32>>,
    /// `padding_mask_crop`'s region (x1, y1, x2, y2) in the init image.
    pub crop: Option<(i64, i64, i64, i64)>,
}

/// The output size of an inpainting / img2img request: explicit, else the init image's (area
/// capped, floored to `multiple`).
pub fn init_output_size(req: &Request, init: &RgbImage, multiple: usize) -> Result<(usize, usize)> {
    let (fw, fh) = crate::inpaint::init_size(init.width, init.height, multiple);
    if (fw == 0 || fh == 0) && (req.width.is_none() || req.height.is_none()) {
        return Err(Error::InvalidArgument(format!(
            "--init-image is {}x{}; it must be at least {multiple} pixels a side",
            init.width, init.height
        )));
    }
    let (w, h) = (req.width.unwrap_or(fw), req.height.unwrap_or(fh));
    crate::limits::check_output_size(w, h, multiple)?;
    Ok((w, h))
}

/// Resize the init image and mask to the output size and find the crop region, as
/// `Flux2KleinInpaintPipeline.__call__` does (area cap to 1024², Lanczos resize, binarised mask;
/// with `padding_mask_crop`, the crop around the mask and the fill resize).
pub fn prepare_init(req: &Request, init: &RgbImage, width: usize, height: usize) -> Result<PreparedInit> {
    let (rw, rh) = capped_reference_size(init.width, init.height);
    let capped = if (rw, rh) != (init.width, init.height) { init.resize_lanczos(rw, rh) } else { init.clone() };
    let sized = |img: &RgbImage| {
        if (img.width, img.height) == (width, height) {
            img.clone()
        } else {
            img.resize_lanczos(width, height)
        }
    };
    let crop = match (req.mask_crop, &req.mask) {
        (Some(pad), Some(mask)) => {
            if (rw, rh) != (init.width, init.height) {
                return Err(Error::InvalidArgument(format!(
                    "--mask-crop works on init images of at most {REFERENCE_MAX_AREA} pixels (this one is {}x{} and \
                     would be resized, which the reference's overlay does not support)",
                    init.width, init.height
                )));
            }
            Some(crate::inpaint::crop_region(mask, width, height, pad))
        }
        _ => None,
    };
    let fill = |img: &RgbImage, c: (i64, i64, i64, i64)| {
        crate::inpaint::resize_and_fill(&img.crop(c.0, c.1, c.2, c.3), width, height)
    };
    let image = match crop {
        Some(c) => fill(&capped, c),
        None => sized(&capped),
    };
    let mask = req.mask.as_ref().map(|m| {
        let m = match crop {
            Some(c) => fill(m, c),
            None => sized(m),
        };
        crate::inpaint::binarize(&m)
    });
    Ok(PreparedInit { image, mask, crop })
}

/// How the components are stored and when they are on the device.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub text_encoder_precision: Option<EncoderPrecision>,
    /// Transformer block linears (bf16 / FP8) and attention (exact / Sage).
    pub transformer_compute: Compute,
    pub residency: Residency,
    /// Prompt-embedding disk cache: folder and size bound.
    pub prompt_cache: Option<(std::path::PathBuf, u64)>,
    /// LoRAs for the transformer (merged at load, or applied at run time).
    pub loras: crate::lora::LoraOptions,
}

/// What stays on the device between stages (from the memory plan; everything by default).
#[derive(Debug, Clone, Copy)]
pub struct Residency {
    pub evict_text_encoder_after_encode: bool,
    pub evict_transformer_before_decode: bool,
    /// Load every component at start (else each on first use).
    pub eager: bool,
    /// Decode in tiles of this many pixels.
    pub decode_tile: Option<usize>,
    /// Keep only this many transformer blocks on the device; stream the others from the file.
    pub resident_blocks: Option<usize>,
}

impl Default for Residency {
    fn default() -> Self {
        Residency {
            evict_text_encoder_after_encode: false,
            evict_transformer_before_decode: false,
            eager: true,
            decode_tile: None,
            resident_blocks: None,
        }
    }
}

impl Residency {
    pub fn from_plan(plan: &crate::planner::Plan) -> Residency {
        Residency {
            evict_text_encoder_after_encode: plan.evict_encoder_after_encode,
            evict_transformer_before_decode: plan.evict_transformer_before_decode,
            eager: matches!(
                plan.transformer,
                crate::planner::TransformerResidency::Resident | crate::planner::TransformerResidency::LoadDuringEncode
            ),
            decode_tile: plan.decode_tile,
            resident_blocks: match plan.transformer {
                crate::planner::TransformerResidency::StreamBlocks { resident_blocks } => Some(resident_blocks),
                _ => None,
            },
        }
    }
}

impl Pipeline {
    pub fn load(be: Arc<dyn Backend>, root: &Path) -> Result<Pipeline> {
        Pipeline::load_with(be, root, LoadOptions::default())
    }

    pub fn load_with(be: Arc<dyn Backend>, root: &Path, options: LoadOptions) -> Result<Pipeline> {
        Pipeline::load_from(be, PipelineInfo::read(root)?, options)
    }

    /// Load from a folder, separate component files, or a mix (see [`PipelineInfo::assemble`]).
    pub fn load_from(be: Arc<dyn Backend>, info: PipelineInfo, options: LoadOptions) -> Result<Pipeline> {
        let tokenizer = match &info.tokenizer {
            Some(dir) => PromptTokenizer::load(dir)?,
            None => PromptTokenizer::builtin()?,
        };
        let encoder_config = crate::model::qwen3::open(&info.text_encoder)?.1;
        let transformer_config = crate::model::transformer::open(&info.transformer)?.2;
        let (vae, vae_seconds) =
            timed_load("vae decoder", || Vae::load(be.clone(), &info.vae, VaeParts { encoder: false, decoder: true }))?;
        let root = info.origin().to_path_buf();
        let root = root.as_path();
        let scheduler_path = info.root.as_ref().map(|r| r.join("scheduler/scheduler_config.json"));
        let scheduler = if let Some(scheduler_path) = scheduler_path.filter(|p| p.is_file()) {
            SchedulerConfig::from_json_file(&scheduler_path)?
        } else {
            SchedulerConfig::default()
        };
        let context_dim = KLEIN_OUT_LAYERS.len() * encoder_config.hidden_size;
        if context_dim != transformer_config.joint_attention_dim {
            return Err(Error::config(
                root,
                format!(
                    "the text encoder gives {context_dim}-wide features but the transformer expects {}",
                    transformer_config.joint_attention_dim
                ),
            ));
        }
        if vae.config().packed_channels() != transformer_config.in_channels {
            return Err(Error::config(
                root,
                format!(
                    "the VAE's latents have {} channels but the transformer takes {}",
                    vae.config().packed_channels(),
                    transformer_config.in_channels
                ),
            ));
        }
        let prompt_cache = match &options.prompt_cache {
            Some((dir, max)) => {
                let precision = options.text_encoder_precision.unwrap_or(EncoderPrecision::Bf16);
                let settings = format!(
                    "{precision:?} {:?} {KLEIN_OUT_LAYERS:?} {MAX_TOKENS} {PROMPT_PREFIX:?} {PROMPT_SUFFIX:?}",
                    be.activation_dtype()
                );
                let shape = [1, MAX_TOKENS, context_dim];
                Some(
                    PromptCache::new(dir.clone(), *max, &info.text_encoder, info.tokenizer.as_deref(), &settings)?
                        .expecting(&shape, be.activation_dtype()),
                )
            }
            None => None,
        };
        let telemetry = crate::telemetry::Telemetry::for_backend(&be);
        let pipeline = Pipeline {
            be,
            info,
            tokenizer,
            text_encoder: Mutex::new(None),
            transformer: Mutex::new(None),
            transformer_config,
            vae,
            vae_encoder: Mutex::new(None),
            scheduler,
            prompt_cache,
            telemetry,
            options,
            step_sync: false,
            latent_rgb: Mutex::new(None),
            load_log: Mutex::new(vec![("vae decoder", vae_seconds)]),
        };
        if pipeline.options.residency.eager {
            pipeline.text_encoder()?;
            pipeline.transformer()?;
        }
        Ok(pipeline)
    }

    /// The text encoder, loading it if it is not on the device.
    pub fn text_encoder(&self) -> Result<Arc<Qwen3TextEncoder>> {
        let mut slot = self.text_encoder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let precision = self.options.text_encoder_precision.unwrap_or(EncoderPrecision::Bf16);
        let encoder = Arc::new(self.log_load("text encoder", || {
            Qwen3TextEncoder::load_with(self.be.clone(), &self.info.text_encoder, &KLEIN_OUT_LAYERS, precision)
        })?);
        *slot = Some(encoder.clone());
        Ok(encoder)
    }

    /// The VAE encoder, loading it if it is not on the device.
    fn vae_encoder(&self) -> Result<Arc<Vae>> {
        let mut slot = self.vae_encoder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = slot.as_ref() {
            return Ok(v.clone());
        }
        let parts = VaeParts { encoder: true, decoder: false };
        let encoder = Arc::new(self.log_load("vae encoder", || Vae::load(self.be.clone(), &self.info.vae, parts))?);
        *slot = Some(encoder.clone());
        Ok(encoder)
    }

    /// The transformer, loading it if it is not on the device.
    pub fn transformer(&self) -> Result<Arc<Flux2Transformer>> {
        let mut slot = self.transformer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let blocks = self.options.residency.resident_blocks;
        let path = self.info.transformer.clone();
        let t = Arc::new(self.log_load("transformer", || {
            Flux2Transformer::load_with_loras(
                self.be.clone(),
                &path,
                blocks,
                self.options.transformer_compute,
                &self.options.loras,
            )
        })?);
        *slot = Some(t.clone());
        Ok(t)
    }

    /// `timed_load`, recorded in the load log.
    fn log_load<T>(&self, name: &'static str, load: impl FnOnce() -> Result<T>) -> Result<T> {
        let (loaded, seconds) = timed_load(name, load)?;
        self.load_log.lock().unwrap_or_else(|e| e.into_inner()).push((name, seconds));
        Ok(loaded)
    }

    /// Every component load so far, in order: (component, seconds). A component evicted and
    /// loaded again appears again.
    pub fn load_times(&self) -> Vec<(&'static str, f64)> {
        self.load_log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn sample(&self, stage: &'static str, into: &mut Vec<(&'static str, crate::telemetry::Sample)>) {
        if let Some(t) = &self.telemetry {
            into.push((stage, t.sample()));
        }
    }

    /// Change what stays on the device between stages (a server plans each request's size).
    pub fn set_residency(&mut self, residency: Residency) {
        self.options.residency = residency;
    }

    /// Whether each model is on the device now: (text encoder, transformer).
    pub fn resident(&self) -> (bool, bool) {
        let encoder = self.text_encoder.lock().map(|s| s.is_some()).unwrap_or(false);
        let transformer = self.transformer.lock().map(|s| s.is_some()).unwrap_or(false);
        (encoder, transformer)
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.be
    }

    /// The preview projection (fitted to this pipeline's VAE on the first call).
    pub fn latent_to_rgb(&self) -> Result<Arc<crate::preview::LatentToRgb>> {
        let mut slot = self.latent_rgb.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let fit =
            Arc::new(crate::preview::LatentToRgb::fit(&*self.be, &self.vae, self.transformer_config.in_channels)?);
        tracing::info!("preview projection fitted to the VAE (R² {:.3})", fit.r2);
        *slot = Some(fit.clone());
        Ok(fit)
    }

    /// Synchronise the device after every denoising step, so `Timings::steps` are device times
    /// (benchmarks; costs a host round trip per step).
    pub fn set_step_sync(&mut self, on: bool) {
        self.step_sync = on;
    }

    /// Whether the VAE encoder has been loaded (references need it; text-to-image does not).
    pub fn vae_encoder_loaded(&self) -> bool {
        self.vae_encoder.lock().map(|s| s.is_some()).unwrap_or(false)
    }

    /// Pixels per transformer token side (VAE factor × 2×2 patch): 16 for FLUX.2.
    pub fn pixel_multiple(&self) -> usize {
        self.vae.config().pixel_multiple()
    }

    /// Encode the prompt, plus "" for CFG when `cfg` is set: from the disk cache when it holds
    /// them, else with the text encoder (evicted afterwards if the residency plan says so).
    pub fn encode(&self, prompt: &str, cfg: bool) -> Result<EncodedPrompt> {
        self.encode_with_negative(prompt, cfg.then_some(""))
    }

    /// Encode the prompt and, for CFG, a negative prompt (diffusers' `negative_prompt`).
    pub fn encode_with_negative(&self, prompt: &str, negative: Option<&str>) -> Result<EncodedPrompt> {
        let context = self.encode_one(prompt, Check::PromptEmbeddings)?;
        let negative = match negative {
            Some(n) => Some(self.encode_one(n, Check::NegativeEmbeddings)?),
            None => None,
        };
        if self.options.residency.evict_text_encoder_after_encode {
            *self.text_encoder.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        Ok(EncodedPrompt { prompt: prompt.to_string(), context, negative })
    }

    fn encode_one(&self, prompt: &str, check: Check) -> Result<Tensor> {
        // Tokenize first: cheap, and it warns about truncation whether or not the cache hits.
        let tokens = self.tokenizer.encode_prompt(prompt, MAX_TOKENS)?;
        if let Some(hit) = self.prompt_cache.as_ref().and_then(|c| c.get(prompt)) {
            return self.be.upload(&hit, self.be.activation_dtype());
        }
        let encoder = self.text_encoder()?;
        let stage = crate::progress::Stage::spinner("encode");
        stage.message(format!("{} tokens", tokens.length));
        let context = encoder.forward(&[tokens])?;
        tracing::info!("prompt encoded in {:.2}s", stage.finish().as_secs_f64());
        // Checked before it is cached: a broken encoder must not leave broken cache entries.
        health::record(&*self.be, &context, check)?;
        health::verify(&*self.be, 0)?;
        if let Some(cache) = &self.prompt_cache {
            if let Err(e) = cache.put(prompt, &context, self.be.activation_dtype()) {
                tracing::warn!("could not write the prompt cache: {e}");
            }
        }
        Ok(context)
    }

    /// Check, resize (area cap), centre-crop and encode the references (diffusers' editing path).
    pub fn prepare_references(&self, images: &[RgbImage]) -> Result<Option<References>> {
        if images.is_empty() {
            return Ok(None);
        }
        let be = &*self.be;
        let multiple = self.pixel_multiple();
        let mut tokens = Vec::new();
        let mut ids = Vec::new();
        let mut first_size = (0, 0);
        let mut grids = Vec::new();
        crate::limits::check_reference_count(images.len())?;
        for (i, img) in images.iter().enumerate() {
            let (w, h) = (img.width, img.height);
            crate::limits::check_reference(i, w, h)?;
            let (rw, rh) = capped_reference_size(w, h);
            let img = if (rw, rh) != (w, h) { img.resize_lanczos(rw, rh) } else { img.clone() };
            let (cw, ch) = reference_size(w, h, multiple);
            let img = img.center_crop(cw, ch);
            if i == 0 {
                first_size = (cw, ch);
            }
            let x = be.upload(&img.to_tensor()?, be.activation_dtype())?;
            let latents = self.vae_encoder()?.encode_normalized(&x)?;
            let (lh, lw) = (latents.dim(2), latents.dim(3));
            grids.push((lh, lw));
            tokens.push(pack(be, &latents)?);
            ids.push(PositionIds::image(10.0 + 10.0 * i as f32, lh, lw));
        }
        let tokens = be.concat(&tokens.iter().collect::<Vec<_>>(), 1)?;
        health::record(be, &tokens, Check::ReferenceLatents)?;
        health::verify(be, 0)?;
        let ids = PositionIds::concat(&ids.iter().collect::<Vec<_>>())?;
        Ok(Some(References { tokens, ids, first_size, grids }))
    }

    /// Generate one image. `prompt` may be pre-encoded (for several seeds of one prompt).
    pub fn generate(
        &self,
        req: &Request,
        encoded: Option<&EncodedPrompt>,
        refs: Option<&References>,
    ) -> Result<Output> {
        let mut outputs = self.generate_batch(req, 1, encoded, refs)?;
        Ok(outputs.remove(0))
    }

    /// Generate `n` images in one batch through the DiT: seeds `req.seed .. req.seed + n - 1`, or
    /// the `n` rows of `req.noise` (`[n, 4z, H/16, W/16]`). Each image equals its single run
    /// within the backend's tolerance (the same ops on more rows).
    pub fn generate_batch(
        &self,
        req: &Request,
        n: usize,
        encoded: Option<&EncodedPrompt>,
        refs: Option<&References>,
    ) -> Result<Vec<Output>> {
        let be = &*self.be;
        if n == 0 {
            return Err(Error::InvalidArgument("a batch needs at least one image".into()));
        }
        let (default_steps, default_guidance) = self.info.defaults();
        req.validate()?;
        let steps = req.steps.unwrap_or(default_steps);
        let guidance = req.guidance.unwrap_or(default_guidance);
        let cfg = self.info.uses_cfg(Some(guidance));
        if self.info.is_distilled && guidance > 1.0 {
            tracing::warn!("guidance {guidance} is ignored: this is a guidance-distilled model (no CFG)");
        }
        let mut timings = Timings { steps_synchronized: self.step_sync, ..Default::default() };
        let mut telemetry = Vec::new();

        let owned;
        let prompt = match encoded {
            Some(e) if e.prompt == req.prompt && (!cfg || e.negative.is_some()) => e,
            _ => {
                let stage = Stage::new("encode", 1);
                owned = self.encode(&req.prompt, cfg)?;
                stage.tick();
                timings.encode = stage.finish();
                self.sample("encode", &mut telemetry);
                &owned
            }
        };

        let first_reference = refs.map(|r| r.first_size);
        let m = self.pixel_multiple();
        let (width, height) = match &req.init_image {
            Some(init) => init_output_size(req, init, m)?,
            None => output_size(req.width, req.height, first_reference, req.noise.as_ref(), m)?,
        };
        let (h, w) = (height / m, width / m);
        let c = self.transformer_config.in_channels;
        let transformer = self.transformer()?;
        let act = be.activation_dtype();
        let noise = match &req.noise {
            Some(x) => {
                if x.shape() != [n, c, h, w] {
                    return Err(Error::InvalidArgument(format!(
                        "the noise tensor is {:?}; {} {width}x{height} image{} need{} [{n}, {c}, {h}, {w}]",
                        x.shape(),
                        if n == 1 { "a".to_string() } else { n.to_string() },
                        if n == 1 { "" } else { "s" },
                        if n == 1 { "s" } else { "" },
                    )));
                }
                x.clone()
            }
            None => {
                let mut all = Vec::with_capacity(n * c * h * w);
                for i in 0..n {
                    all.extend(seeded_noise(req.seed.wrapping_add(i as u64), &[1, c, h, w])?.to_vec_f32()?);
                }
                Tensor::from_f32(all, &[n, c, h, w])?
            }
        };
        // `n` copies along the batch of a `[1, ..]` tensor.
        let repeat = |x: &Tensor, k: usize| -> Result<Tensor> {
            if k == 1 {
                Ok(x.clone())
            } else {
                be.concat(&vec![x; k], 0)
            }
        };
        let schedule = Schedule::new(&self.scheduler, h * w, steps)?;
        let noise = pack(be, &be.upload(&noise, act)?)?;

        // Inpainting / img2img: the init image's latents, noised to the starting sigma, are the
        // starting point and also the first condition image (t = 10; references follow at 20, ...).
        let init = match &req.init_image {
            Some(img) => {
                let prepared = prepare_init(req, img, width, height)?;
                let x = be.upload(&prepared.image.to_tensor()?, act)?;
                let tokens = pack(be, &self.vae_encoder()?.encode_normalized(&x)?)?;
                health::record(be, &tokens, Check::ReferenceLatents)?;
                let tokens = repeat(&tokens, n)?;
                let mask = match &prepared.mask {
                    Some(pixels) => {
                        Some(MaskBlend::new(be, &crate::inpaint::mask_tokens(pixels, width, height, w, h))?)
                    }
                    None => None,
                };
                Some((prepared, tokens, mask))
            }
            None => None,
        };
        let t_start = match &req.init_image {
            Some(_) => crate::inpaint::start_step(steps, req.strength.unwrap_or(crate::inpaint::DEFAULT_STRENGTH))?,
            None => 0,
        };
        let mut latents = match &init {
            Some((_, tokens, _)) => {
                let sigma = schedule.sigmas[t_start];
                be.axpby(sigma, &noise, 1.0 - sigma, tokens)?
            }
            None => noise.clone(),
        };
        let img_ids = PositionIds::image(0.0, h, w);
        let txt_ids = PositionIds::text(prompt.context.dim(1));
        let (condition, condition_ids) = match (&init, refs) {
            (Some((_, tokens, _)), Some(r)) => (
                Some(be.concat(&[tokens, &repeat(&r.tokens, n)?], 1)?),
                Some(PositionIds::concat(&[&PositionIds::image(10.0, h, w), &r.ids_from(20.0)?])?),
            ),
            (Some((_, tokens, _)), None) => (Some(tokens.clone()), Some(PositionIds::image(10.0, h, w))),
            (None, Some(r)) => (Some(repeat(&r.tokens, n)?), Some(r.ids.clone())),
            (None, None) => (None, None),
        };
        let all_ids = match &condition_ids {
            Some(ids) => PositionIds::concat(&[&img_ids, ids])?,
            None => img_ids.clone(),
        };
        // The batch's rows, then (CFG) as many unconditional rows, in one DiT batch.
        let context = match &prompt.negative {
            Some(neg) if cfg => be.concat(&[&repeat(&prompt.context, n)?, &repeat(neg, n)?], 0)?,
            _ => repeat(&prompt.context, n)?,
        };
        let rows = context.dim(0);

        if req.kv_cache && refs.is_none() {
            return Err(Error::InvalidArgument(
                "--kv-cache needs reference images (--ref): it caches their keys and values".into(),
            ));
        }
        // The KV scheme (diffusers' Flux2KleinKVPipeline): the first step runs the condition tokens
        // (prepended, modulated at t = 0, attending only to themselves) and keeps their K/V; the
        // later steps run the image tokens alone against the kept K/V.
        let use_kv = (self.info.kv || req.kv_cache) && condition.is_some();
        // Set once, at the first step; the cached steps (recorded at their second) borrow it.
        let kv_cache = std::cell::OnceCell::new();
        let mut cached_steps: Option<Steps> = None;
        let mut step_times = Vec::with_capacity(steps - t_start);

        let mode = req.timestep_mode.unwrap_or(TimestepMode::Diffusers);
        let run_steps = steps - t_start;
        let stage = Stage::new("denoise", run_steps as u64);
        let preview = match req.preview_every {
            Some(k) => Some((k, self.latent_to_rgb()?)),
            None => None,
        };
        let mut previews: Vec<Vec<(usize, RgbImage)>> = vec![Vec::new(); n];
        // The plain step is recorded at the second step and replayed (CUDA graphs).
        let mut plain_steps = Steps::new(&transformer, &context, &all_ids, &txt_ids, None, !use_kv);
        for i in 0..run_steps {
            let step_start = std::time::Instant::now();
            let s = t_start + i;
            let step_input = latents.clone();
            let t = vec![schedule.model_time(s, mode, act); rows];
            let v = if use_kv {
                let cfg_rows = |x: &Tensor| if rows == 2 * n { be.concat(&[x, x], 0) } else { Ok(x.clone()) };
                let input = cfg_rows(&latents)?;
                match kv_cache.get() {
                    None => {
                        let (cond, cond_ids) = (condition.as_ref().unwrap(), condition_ids.as_ref().unwrap());
                        let (v, cache) = transformer.forward_kv_extract(
                            &input,
                            &cfg_rows(cond)?,
                            &context,
                            &t,
                            &img_ids,
                            cond_ids,
                            &txt_ids,
                            0.0,
                        )?;
                        tracing::debug!("reference K/V cache: {} tokens, {} bytes", cache.tokens, cache.bytes());
                        let _ = kv_cache.set(cache);
                        v
                    }
                    Some(cache) => {
                        let steps = cached_steps.get_or_insert_with(|| {
                            Steps::new(&transformer, &context, &img_ids, &txt_ids, Some(cache), true)
                        });
                        let v = steps.forward(&input, &t, None)?;
                        timings.replayed_steps += usize::from(steps.replaying());
                        v
                    }
                }
            } else {
                let mut input = match &condition {
                    Some(cond) => be.concat(&[&latents, cond], 1)?,
                    None => latents.clone(),
                };
                if rows == 2 * n {
                    input = be.concat(&[&input, &input], 0)?;
                }
                let v = plain_steps.forward(&input, &t, None)?;
                timings.replayed_steps += usize::from(plain_steps.replaying());
                v.narrow(1, 0, h * w)?
            };
            let v = if rows == 2 * n {
                let (cond, uncond) = (v.narrow(0, 0, n)?, v.narrow(0, n, n)?);
                be.axpby(1.0 - guidance, &uncond, guidance, &cond)?
            } else {
                v
            };
            latents = be.axpby(1.0, &latents, schedule.dt(s), &v)?;
            if let Some((k, projection)) = &preview {
                if (i + 1) % k == 0 {
                    // Flow matching: x_t = (1 − σ)·x₀ + σ·ε and v = ε − x₀, so x₀ = x_t − σ·v.
                    let x0 = be.axpby(1.0, &step_input, -schedule.sigmas[s], &v)?;
                    for (b, list) in previews.iter_mut().enumerate() {
                        let grid = unpack(be, &x0.narrow(0, b, 1)?, h, w)?;
                        list.push((i + 1, projection.apply(be, &self.vae, &grid)?));
                    }
                }
            }
            // The known region is re-imposed: the init latents noised to the next sigma (clean
            // after the last step), blended through the token mask.
            if let Some((_, tokens, Some(mask))) = &init {
                let known = if i + 1 < run_steps {
                    let sigma = schedule.sigmas[s + 1];
                    be.axpby(sigma, &noise, 1.0 - sigma, tokens)?
                } else {
                    tokens.clone()
                };
                latents = mask.blend(be, &known, &latents)?;
            }
            health::record(be, &latents, Check::Step(i))?;
            if timings.steps_synchronized {
                be.synchronize()?;
            }
            step_times.push(step_start.elapsed());
            stage.tick();
            if let Some(hook) = &req.on_step {
                let preview = previews.first().and_then(|l| l.last()).filter(|(s, _)| *s == i + 1).map(|(_, p)| p);
                if !(hook.0)(&StepProgress { step: i + 1, steps: run_steps, preview }) {
                    return Err(Error::Cancelled);
                }
            }
        }
        drop((plain_steps, cached_steps));
        drop(kv_cache);
        timings.steps = step_times;
        // One read for the whole loop: the earliest step that went non-finite.
        health::verify(be, run_steps)?;
        timings.denoise = stage.finish();
        self.sample("denoise", &mut telemetry);
        drop(transformer);
        if self.options.residency.evict_transformer_before_decode {
            *self.transformer.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }

        let stage = Stage::new("decode", n as u64);
        let mut decoded = Vec::with_capacity(n);
        for b in 0..n {
            let grid = unpack(be, &latents.narrow(0, b, 1)?, h, w)?;
            let pixels = self.vae.decode_normalized_tiled(&grid, self.options.residency.decode_tile)?;
            health::record(be, &pixels, Check::DecodedImage)?;
            health::verify(be, run_steps)?;
            let mut image = RgbImage::from_decoded(&pixels.to_vec_f32()?, width, height)?;
            if let (Some((prepared, _, _)), Some(init), Some(mask)) = (&init, &req.init_image, &req.mask) {
                if let Some(crop) = prepared.crop {
                    image = crate::inpaint::apply_overlay(mask, init, &image, crop);
                }
            }
            decoded.push((image, grid, pixels));
            stage.tick();
        }
        timings.decode = stage.finish();
        self.sample("decode", &mut telemetry);
        Ok(decoded
            .into_iter()
            .zip(previews)
            .map(|((image, latents, pixels), previews)| Output {
                image,
                latents,
                pixels,
                steps: run_steps,
                guidance,
                timings: timings.clone(),
                telemetry: telemetry.clone(),
                previews,
            })
            .collect())
    }
}

/// `(1 - m)·known + m·latents` per token (diffusers' mask re-imposition), as two per-token
/// scalings and a sum, so it runs on every backend with the existing ops.
struct MaskBlend {
    mask: Tensor,
    inverse: Tensor,
    zeros: Tensor,
}

impl MaskBlend {
    fn new(be: &dyn Backend, mask: &[f32]) -> Result<MaskBlend> {
        let n = mask.len();
        let up = |v: Vec<f32>| be.upload(&Tensor::from_f32(v, &[n])?, DType::F32);
        Ok(MaskBlend {
            mask: up(mask.to_vec())?,
            inverse: up(mask.iter().map(|m| 1.0 - m).collect())?,
            zeros: up(vec![0.0; n])?,
        })
    }

    /// `known`, `latents` `[1, L, C]`.
    fn blend(&self, be: &dyn Backend, known: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let as_grid = |x: &Tensor| be.contiguous(x)?.reshape(&[x.dim(0), x.dim(1), x.dim(2), 1]);
        let keep = be.channel_affine(&as_grid(known)?, &self.inverse, &self.zeros)?;
        let new = be.channel_affine(&as_grid(latents)?, &self.mask, &self.zeros)?;
        be.axpby(1.0, &keep, 1.0, &new)?.reshape(latents.shape())
    }
}

/// The initial noise `generate` draws for `seed` (flux2's own generator: a seed gives the same
/// noise on every machine, but not the numbers torch would draw).
pub fn seeded_noise(seed: u64, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_f32(crate::rng::normal_vec(seed, "flux2-noise", shape.iter().product()), shape)
}
