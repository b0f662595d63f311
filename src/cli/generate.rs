//! `flux2 generate`: text-to-image and multi-reference editing with a klein pipeline.

use std::path::{Path, PathBuf};

use crate::backend::cpu::CpuPrecision;
use crate::device::{self, DeviceChoice};
use crate::error::{Error, Result};
use crate::image_io::RgbImage;
use crate::model::transformer::{AttentionMode, Compute};
use crate::pipeline::{LoadOptions, Output, Pipeline, Request, Residency};
use crate::planner::{EncoderPrecision, TransformerPrecision};
use crate::sampler::TimestepMode;
use crate::weights::WeightStore;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: crate::cli::model_args::ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Image width in pixels (multiple of 16). Default: the first reference's, else 1024.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (multiple of 16). Default: the first reference's, else 1024.
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps. Default: 4 for distilled models, 50 for base models.
    #[arg(long)]
    pub steps: Option<usize>,
    /// CFG scale for base models (default 4.0); distilled models ignore it.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Seed of the initial noise (random when omitted; printed and stored in the PNG).
    #[arg(long)]
    pub seed: Option<u64>,
    /// A safetensors file with one f32 tensor `noise` [1, 4·latent_channels, H/16, W/16], used as
    /// the initial latents (diffusers' `latents=`).
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Reference image for editing (repeatable; ids t = 10, 20, ...).
    #[arg(long = "ref")]
    pub references: Vec<PathBuf>,
    /// Inpainting / img2img: start from this image (diffusers' Flux2KleinInpaintPipeline). The
    /// output size defaults to its size (area-capped to 1024², floored to multiples of 16).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// How much of the init image is re-generated, in (0, 1]: selects the starting sigma of the
    /// schedule (default 0.8).
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting mask, the init image's size: white is repainted, black kept. Without it the
    /// run is img2img.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Work on the region around the mask, padded by this many pixels, at the full output size,
    /// and paste it back (diffusers' `padding_mask_crop`).
    #[arg(long)]
    pub mask_crop: Option<usize>,
    /// Compute the reference images' keys and values once, at the first step, and reuse them for
    /// the others (diffusers' Flux2KleinKVPipeline scheme; always on for KV-variant models such as
    /// FLUX.2-klein-9b-kv). Needs --ref.
    #[arg(long)]
    pub kv_cache: bool,
    /// Every K steps, write a cheap preview of the current x₀ estimate (a linear latent-to-RGB
    /// projection fitted to the VAE, 1/8 of the size) to `<out stem>-preview-<step>.png`.
    #[arg(long)]
    pub preview_every: Option<usize>,
    /// Number of images, with seeds S, S+1, ...; the prompt is encoded once.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Images generated together as one batch through the DiT (the GPU's throughput case), with
    /// seeds S, S+1, ...; each equals its single run. With --count K, K batches (K·N images).
    /// With --noise, the file holds [N, ...] noise.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Output PNG. With more than one image, `-<seed>` is added before the extension.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU backend only: bf16 keeps the weights as stored (bf16/f16/fp8, in the memory map) and
    /// runs bf16 GEMMs; f32 widens every weight (the exact reference).
    #[arg(long, value_enum, default_value_t = CpuPrecision::Bf16)]
    pub cpu_precision: CpuPrecision,
    /// Timestep rounding to reproduce: diffusers (in the compute dtype), diffusers-bf16, or bfl.
    #[arg(long, value_enum, default_value_t = TimestepMode::Diffusers)]
    pub timesteps: TimestepMode,
    /// Transformer block linears: bf16, or fp8 (e4m3 weights per channel, per-token fp8
    /// activations; also what the official *-fp8.safetensors files hold).
    #[arg(long, value_enum, default_value_t = TransformerPrecision::Bf16)]
    pub precision: TransformerPrecision,
    /// Transformer attention: exact, or sage (INT8 Q·Kᵀ with K smoothing, FP8 P·V).
    #[arg(long, value_enum, default_value_t = AttentionMode::Exact)]
    pub attention: AttentionMode,
    /// Storage of the text encoder's linears: bf16, fp8, int8 (per channel) or int4 (groups of 64).
    #[arg(long, value_enum, default_value_t = EncoderPrecision::Bf16)]
    pub text_encoder_precision: EncoderPrecision,
    /// GPU memory budget, e.g. 16GiB (default: the free VRAM of the device in use, minus 5% and
    /// 256 MiB). The memory plan decides what stays resident; allocations beyond the budget fail.
    #[arg(long)]
    pub vram_budget: Option<String>,
    /// A LoRA, LoKr or LoHa file for the transformer, optionally with a strength (default 1):
    /// `--lora style.safetensors:0.7`. Repeatable; the deltas add up. Formats (diffusers/PEFT,
    /// BFL/ai-toolkit, kohya/musubi-tuner, LyCORIS) are detected from the keys.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<crate::lora::LoraSpec>,
    /// merge: add the LoRAs into the weights at load (no run-time cost); runtime: keep them
    /// beside the weights as low-rank products (switchable without reloading the model).
    #[arg(long, value_enum, default_value_t = crate::lora::LoraMode::Merge)]
    pub lora_mode: crate::lora::LoraMode,
    /// Do not read or write the prompt-embedding disk cache.
    #[arg(long)]
    pub no_prompt_cache: bool,
    /// Write a JSON report: per-stage timings, peak device memory, NVML readings, the
    /// numerical health check.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Check every op's output for NaN/inf (slow: one device synchronisation per op) and stop at
    /// the first op that produced one, naming it and the model component it ran in.
    #[arg(long)]
    pub debug_nans: bool,
}

/// clap's parser for `--lora FILE[:SCALE]`.
pub fn parse_lora(s: &str) -> std::result::Result<crate::lora::LoraSpec, String> {
    crate::lora::LoraSpec::parse(s).map_err(|e| e.to_string())
}

/// Read every LoRA file's keys before the model loads, so a bad file fails at once.
pub fn check_loras(loras: &[crate::lora::LoraSpec]) -> Result<()> {
    for spec in loras {
        let file = crate::lora::LoraFile::open(&spec.path)?;
        tracing::info!("LoRA {}: {}", spec.path.display(), file.keys.describe());
    }
    Ok(())
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    crate::limits::check_count(args.count)?;
    crate::limits::check_batch(args.batch)?;
    if args.kv_cache && args.references.is_empty() {
        return Err(Error::InvalidArgument(
            "--kv-cache needs reference images (--ref): it caches their keys and values".into(),
        ));
    }
    crate::limits::check_reference_count(args.references.len())?;
    if let Some(ext) = args.out.extension().and_then(|e| e.to_str()) {
        if !ext.eq_ignore_ascii_case("png") {
            return Err(Error::InvalidArgument(format!("--out {}: only PNG output is supported", args.out.display())));
        }
    }
    let info = args.model.resolve()?;
    let noise = match &args.noise {
        Some(p) => Some(crate::cli::read_f32(&WeightStore::open(p)?, "noise")?),
        None => None,
    };
    let seed = args.seed.unwrap_or_else(random_seed);
    let load_flag = |flag: &str, p: &Option<PathBuf>| -> Result<Option<RgbImage>> {
        match p {
            Some(p) => RgbImage::load(p).map(Some).map_err(|e| Error::InvalidArgument(format!("{flag}: {e}"))),
            None => Ok(None),
        }
    };
    let init_image = load_flag("--init-image", &args.init_image)?;
    let mask = load_flag("--mask", &args.mask)?;
    let request = |i: usize| Request {
        prompt: args.prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance: args.guidance,
        seed: seed.wrapping_add(i as u64),
        noise: noise.clone(),
        timestep_mode: Some(args.timesteps),
        on_step: None,
        init_image: init_image.clone(),
        strength: args.strength,
        mask: mask.clone(),
        mask_crop: args.mask_crop,
        kv_cache: args.kv_cache,
        preview_every: args.preview_every,
    };
    // Everything that needs no model is checked before the long work starts.
    request(0).validate()?;
    crate::output_file::check_writable(&args.out)?;
    if let Some(json) = &args.json {
        crate::output_file::check_writable(json)?;
    }
    let references = args.references.iter().map(|p| RgbImage::load(p)).collect::<Result<Vec<_>>>()?;
    check_loras(&args.loras)?;
    let be = device::select_with(args.device, args.cpu_precision)?;
    let be: std::sync::Arc<dyn crate::backend::Backend> =
        if args.debug_nans { std::sync::Arc::new(crate::backend::nan_check::NanCheckBackend::new(be)) } else { be };
    tracing::info!("device: {}", be.name());
    // The kernel keeps no peak of anonymous memory: sample it for the report.
    let anon_peak = crate::host_memory::AnonPeak::start();
    let load_start = std::time::Instant::now();
    let plan = memory_plan(args, &info, &be, &references, noise.as_ref(), init_image.as_ref())?;
    let residency = plan.as_ref().map(Residency::from_plan).unwrap_or_default();
    let prompt_cache =
        (!args.no_prompt_cache).then(|| (crate::prompt_cache::default_dir(), crate::prompt_cache::DEFAULT_MAX_BYTES));
    let transformer_compute = Compute { precision: Some(args.precision), attention: args.attention };
    let options = LoadOptions {
        text_encoder_precision: Some(args.text_encoder_precision),
        transformer_compute,
        residency,
        prompt_cache,
        loras: crate::lora::LoraOptions { loras: args.loras.clone(), mode: args.lora_mode },
    };
    let pipeline = Pipeline::load_from(be.clone(), info, options)?;
    be.synchronize()?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let mut runs = Vec::new();
    let result = generate_all(args, &pipeline, &references, &request, &mut runs);
    // A non-finite value ends the run with an error, but the report still says where.
    let health = match &result {
        Ok(()) => serde_json::json!({"finite": true, "checked": HEALTH_CHECKED}),
        Err(Error::NonFinite(m)) => serde_json::json!({"finite": false, "checked": HEALTH_CHECKED, "error": m}),
        Err(_) => return result,
    };
    let memory = crate::device::memory(&be);
    if let Some((_, peak)) = memory {
        let nvml_peak = runs
            .iter()
            .flat_map(|r| r["telemetry"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t["reading"]["memory_used_bytes"].as_u64())
            .max();
        tracing::info!(
            "device memory: engine peak {:.2} GiB{}",
            peak as f64 / 1073741824.0,
            nvml_peak.map(|p| format!(", NVML used up to {:.2} GiB", p as f64 / 1073741824.0)).unwrap_or_default()
        );
    }
    let host = crate::host_memory::process().map(|m| {
        let peak_anonymous = anon_peak.as_ref().map(|a| a.peak_anonymous());
        tracing::info!(
            "host memory: peak resident {:.2} GiB, peak anonymous {}",
            m.peak_resident as f64 / 1073741824.0,
            peak_anonymous.map_or("unknown".into(), |p| format!("{:.2} GiB", p as f64 / 1073741824.0))
        );
        serde_json::json!({
            "peak_resident_bytes": m.peak_resident,
            "peak_anonymous_bytes": peak_anonymous,
            "resident_bytes": m.resident,
            "anonymous_bytes": m.anonymous,
            "file_backed_bytes": m.file,
        })
    });
    if let Some(json_path) = &args.json {
        let loads: Vec<_> = pipeline
            .load_times()
            .iter()
            .map(|(component, seconds)| serde_json::json!({"component": component, "seconds": seconds}))
            .collect();
        let report = serde_json::json!({
            "device": be.name(),
            "model": args.model.describe(),
            "load_seconds": load_seconds,
            "component_loads": loads,
            "host_memory": host,
            "peak_device_bytes": memory.map(|m| m.1),
            "plan": plan,
            "health": health,
            "runs": runs,
        });
        crate::output_file::write_bytes(json_path, serde_json::to_string_pretty(&report).unwrap().as_bytes())?;
    }
    result
}

/// What the numerical health check covers (reported in the JSON).
const HEALTH_CHECKED: &str = "text embeddings, reference latents, the latents after every step, the decoded image";

/// The `--count` loop: encode once, then one image per seed.
fn generate_all(
    args: &GenerateArgs,
    pipeline: &Pipeline,
    references: &[RgbImage],
    request: &dyn Fn(usize) -> Request,
    runs: &mut Vec<serde_json::Value>,
) -> Result<()> {
    let be = pipeline.backend();
    let ref_start = std::time::Instant::now();
    let refs = pipeline.prepare_references(references)?;
    let ref_seconds = ref_start.elapsed().as_secs_f64();
    let mut encoded = None;
    let images = args.count * args.batch;
    for i in 0..args.count {
        let req = request(i * args.batch);
        let cfg = pipeline.info.uses_cfg(req.guidance);
        let encode_start = std::time::Instant::now();
        let loads_before = pipeline.load_times().len();
        if encoded.is_none() {
            encoded = Some(pipeline.encode(&args.prompt, cfg)?);
            be.synchronize()?;
        }
        // A text encoder loaded on first use is reported as its load, not as encoding.
        let encoder_load: f64 = pipeline.load_times()[loads_before..].iter().map(|l| l.1).sum();
        let encode_seconds = encode_start.elapsed().as_secs_f64() - encoder_load;
        let outs = pipeline.generate_batch(&req, args.batch, encoded.as_ref(), refs.as_ref())?;
        for (b, out) in outs.iter().enumerate() {
            let seed = req.seed.wrapping_add(b as u64);
            let path = if images > 1 { numbered(&args.out, seed) } else { args.out.clone() };
            save(out, &path, args, seed)?;
            println!("{}", path.display());
            let mut previews = Vec::new();
            for (step, image) in &out.previews {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
                let preview = path.with_file_name(format!("{stem}-preview-{step}.png"));
                let meta = serde_json::json!({"preview_of": path.display().to_string(), "step": step});
                image.save_png(&preview, &[("flux2", ascii_json(&meta))])?;
                previews.push(serde_json::json!({"step": step, "image": preview.display().to_string()}));
            }
            let t = &out.timings;
            let origin = match &args.noise {
                Some(file) => format!("noise {}", file.display()),
                None => format!("seed {seed}"),
            };
            tracing::info!(
                "{origin}: {}x{}, {} steps; denoise {:.2}s, decode {:.2}s",
                out.image.width,
                out.image.height,
                out.steps,
                t.denoise.as_secs_f64(),
                t.decode.as_secs_f64()
            );
            runs.push(serde_json::json!({
            "seed": args.noise.is_none().then_some(seed),
            "noise": args.noise.as_ref().map(|p| p.display().to_string()),
            "image": path.display().to_string(),
            "width": out.image.width,
            "height": out.image.height,
            "steps": out.steps,
            "batch": args.batch,
            "previews": previews,
            "seconds": {
                "encode": encode_seconds,
                "references": if i == 0 && b == 0 { ref_seconds } else { 0.0 },
                "denoise": t.denoise.as_secs_f64(),
                "per_step": t.denoise.as_secs_f64() / out.steps.max(1) as f64,
                "steps": t.steps.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
                "decode": t.decode.as_secs_f64(),
            },
            "replayed_steps": t.replayed_steps,
            "telemetry": out.telemetry.iter().map(|(stage, s)| serde_json::json!({"stage": stage, "reading": s})).collect::<Vec<_>>(),
        }));
        }
    }
    Ok(())
}

/// The memory plan for this run: with --vram-budget, or on a GPU, the budget is the free VRAM
/// less headroom. On the GPU the budget is then enforced by the backend's allocator.
fn memory_plan(
    args: &GenerateArgs,
    info: &crate::pipeline::PipelineInfo,
    be: &std::sync::Arc<dyn crate::backend::Backend>,
    references: &[RgbImage],
    noise: Option<&crate::tensor::Tensor>,
    init_image: Option<&RgbImage>,
) -> Result<Option<crate::planner::Plan>> {
    let Some((budget, target)) = device::plan_budget(be, args.vram_budget.as_deref(), args.cpu_precision)? else {
        return Ok(None);
    };
    let spec = crate::synth::PipelineSpec::from_info(info)?;
    let m = spec.vae.pixel_multiple();
    let mut refs: Vec<(usize, usize)> =
        references.iter().map(|r| crate::pipeline::reference_size(r.width, r.height, m)).collect();
    let (w, h) = match init_image {
        Some(init) => {
            let req = Request { width: args.width, height: args.height, ..Default::default() };
            let size = crate::pipeline::init_output_size(&req, init, m)?;
            // The init image's latents are also a condition image in the sequence.
            refs.insert(0, size);
            size
        }
        None => crate::pipeline::output_size(args.width, args.height, refs.first().copied(), noise, m)?,
    };
    let input = crate::planner::PlanInput {
        cfg: info.uses_cfg(args.guidance),
        batch: args.batch,
        kv_cache: (args.kv_cache || info.kv) && !references.is_empty(),
        transformer: spec.transformer,
        text_encoder: spec.text_encoder,
        vae: spec.vae,
        transformer_precision: args.precision,
        encoder_precision: args.text_encoder_precision,
        width: w,
        height: h,
        references: refs,
        budget,
        stored_blocks: spec.stored_blocks,
        stored_fp8: spec.stored_fp8,
    };
    let plan = crate::planner::plan_for(&input, target)?;
    tracing::info!("memory plan:\n{}", plan.describe());
    #[cfg(feature = "cuda")]
    if let Some(c) = device::as_cuda(be) {
        c.set_budget(Some(budget));
    }
    Ok(Some(plan))
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    crate::rng::mix64(nanos as u64 ^ std::process::id() as u64) % 1_000_000_000
}

fn numbered(out: &Path, seed: u64) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    out.with_file_name(format!("{stem}-{seed}.png"))
}

/// ASCII-only JSON (non-ASCII escaped as \uXXXX), so it fits a tEXt chunk.
fn ascii_json(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in serde_json::to_string(v).unwrap().chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn save(out: &Output, path: &Path, args: &GenerateArgs, seed: u64) -> Result<()> {
    let (w, h) = (out.image.width, out.image.height);
    let noise = args.noise.as_ref().map(|p| p.display().to_string());
    // With --noise the seed draws nothing: say where the noise came from instead.
    let params = serde_json::json!({
        "prompt": args.prompt,
        "seed": noise.is_none().then_some(seed),
        "noise": noise,
        "steps": out.steps,
        "guidance": out.guidance,
        "width": w,
        "height": h,
        "model": args.model.describe(),
        "references": args.references.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "init_image": args.init_image.as_ref().map(|p| p.display().to_string()),
        "strength": args.init_image.as_ref().map(|_| args.strength.unwrap_or(crate::inpaint::DEFAULT_STRENGTH)),
        "mask": args.mask.as_ref().map(|p| p.display().to_string()),
        "mask_crop": args.mask_crop,
        "sampler": "flow-match euler",
        "generator": format!("flux2 {}", env!("CARGO_PKG_VERSION")),
    });
    // The "parameters" text most image tools read (A1111 style), plus structured JSON.
    let strength = match &args.init_image {
        Some(_) => format!(", Denoising strength: {}", args.strength.unwrap_or(crate::inpaint::DEFAULT_STRENGTH)),
        None => String::new(),
    };
    let origin = match &noise {
        Some(file) => format!("Noise: {file}"),
        None => format!("Seed: {seed}"),
    };
    let a1111 =
        format!(
        "{}\nSteps: {}, Sampler: Euler (flow matching), CFG scale: {}, {origin}, Size: {w}x{h}, Model: {}{strength}",
        args.prompt, out.steps, out.guidance, args.model.describe()
    );
    out.image.save_png(path, &[("parameters", a1111), ("flux2", ascii_json(&params))])
}
