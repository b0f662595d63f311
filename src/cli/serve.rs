//! `flux2 serve`: load the pipeline once per device and answer the OpenAI Images API (see
//! `crate::serve` and docs/serve.md).

use crate::backend::cpu::CpuPrecision;
use crate::device::{self, DeviceChoice};
use crate::error::{Error, Result};
use crate::model::transformer::{AttentionMode, Compute};
use crate::pipeline::{LoadOptions, Pipeline, Residency};
use crate::planner::{EncoderPrecision, TransformerPrecision};
use crate::serve::api::RequestLimits;
use crate::serve::worker::{PlanSettings, Worker};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::cli::model_args::ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port (0: any free port; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// `cuda` runs one worker per visible GPU (CUDA_VISIBLE_DEVICES chooses them).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU backend only: bf16 keeps the weights as stored (bf16/f16/fp8, in the memory map) and
    /// runs bf16 GEMMs; f32 widens every weight (the exact reference).
    #[arg(long, value_enum, default_value_t = CpuPrecision::Bf16)]
    pub cpu_precision: CpuPrecision,
    #[arg(long, value_enum, default_value_t = TransformerPrecision::Bf16)]
    pub precision: TransformerPrecision,
    #[arg(long, value_enum, default_value_t = AttentionMode::Exact)]
    pub attention: AttentionMode,
    #[arg(long, value_enum, default_value_t = EncoderPrecision::Bf16)]
    pub text_encoder_precision: EncoderPrecision,
    /// Memory budget per device, e.g. 16GiB (default on a GPU: its free VRAM less headroom).
    /// Each request follows the memory plan for its size.
    #[arg(long)]
    pub vram_budget: Option<String>,
    #[arg(long)]
    pub no_prompt_cache: bool,
    /// Requests that may wait for a worker; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Largest request body (JSON or multipart with reference images).
    #[arg(long, default_value = "64MiB")]
    pub max_body: String,
    /// Most images per request (`n`).
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// Server-wide LoRA for every request, `FILE[:SCALE]` (repeatable), as in `generate`.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = crate::cli::generate::parse_lora)]
    pub loras: Vec<crate::lora::LoraSpec>,
    #[arg(long, value_enum, default_value_t = crate::lora::LoraMode::Merge)]
    pub lora_mode: crate::lora::LoraMode,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.queue == 0 {
        return Err(Error::InvalidArgument("--queue must be at least 1".into()));
    }
    if args.max_n == 0 {
        return Err(Error::InvalidArgument("--max-n must be at least 1".into()));
    }
    let max_body = crate::planner::parse_bytes(&args.max_body)?;
    let info = args.model.resolve()?;
    crate::cli::generate::check_loras(&args.loras)?;
    let backends = device::select_all(args.device, args.cpu_precision)?;
    let mut workers = Vec::new();
    let mut multiple = 16;
    for (i, be) in backends.into_iter().enumerate() {
        tracing::info!("device {i}: {}", be.name());
        let planned = device::plan_budget(&be, args.vram_budget.as_deref(), args.cpu_precision)?;
        let (budget, target) = (planned.map(|p| p.0), planned.map_or(crate::planner::Target::Gpu, |p| p.1));
        #[cfg(feature = "cuda")]
        if let (Some(c), Some(b)) = (device::as_cuda(&be), budget) {
            c.set_budget(Some(b));
        }
        let options = LoadOptions {
            text_encoder_precision: Some(args.text_encoder_precision),
            transformer_compute: Compute { precision: Some(args.precision), attention: args.attention },
            // Each request plans its own residency; load everything now when there is no budget.
            residency: Residency { eager: budget.is_none(), ..Residency::default() },
            prompt_cache: (!args.no_prompt_cache)
                .then(|| (crate::prompt_cache::default_dir(), crate::prompt_cache::DEFAULT_MAX_BYTES)),
            loras: crate::lora::LoraOptions { loras: args.loras.clone(), mode: args.lora_mode },
        };
        let pipeline = Pipeline::load_from(be, info.clone(), options)?;
        multiple = pipeline.pixel_multiple();
        let plan = PlanSettings {
            budget,
            target,
            transformer_precision: args.precision,
            encoder_precision: args.text_encoder_precision,
        };
        workers.push(Worker::new(i, pipeline, plan));
    }
    let limits = RequestLimits { max_n: args.max_n, multiple };
    let addr = format!("{}:{}", args.host, args.port);
    crate::serve::serve(&addr, args.model.describe(), workers, args.queue, max_body, limits)
}
