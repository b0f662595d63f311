//! `flux2 plan`: the memory plan for a model, size and budget, without a GPU: VRAM for `--device
//! cuda` (the default), the host's available memory and the CPU backend's sizes for `--device cpu`.

use crate::backend::cpu::CpuPrecision;
use crate::error::{Error, Result};
use crate::planner::{self, EncoderPrecision, PlanInput, Target, TransformerPrecision};
use crate::synth::PipelineSpec;

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// `klein-4b`, `klein-9b`, or a pipeline folder.
    #[arg(long)]
    pub config: String,
    /// e.g. 16GiB, 8GiB, 12000MiB. Needed for cuda; on the CPU the default is the host's
    /// available memory less 5% and 256 MiB (as `generate` uses).
    #[arg(long, alias = "budget")]
    pub vram_budget: Option<String>,
    /// Plan for a GPU (`cuda`) or for the CPU backend (host memory, its storage sizes).
    #[arg(long, value_enum, default_value_t = PlanDevice::Cuda)]
    pub device: PlanDevice,
    /// With `--device cpu`: the CPU backend's precision (bf16 is generate's default).
    #[arg(long, value_enum, default_value_t = CpuPrecision::Bf16)]
    pub cpu_precision: CpuPrecision,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    #[arg(long, value_enum, default_value_t = TransformerPrecision::Bf16)]
    pub precision: TransformerPrecision,
    #[arg(long, value_enum, default_value_t = EncoderPrecision::Bf16)]
    pub text_encoder_precision: EncoderPrecision,
    /// A reference image's size, WIDTHxHEIGHT (repeatable); planned at the size it is encoded at.
    #[arg(long = "ref")]
    pub references: Vec<String>,
    /// Plan for real CFG (two transformer rows); the default follows the model (base models use CFG).
    #[arg(long)]
    pub cfg: Option<bool>,
    /// Plan for the KV scheme's reference cache (generate --kv-cache, or a KV-variant model).
    #[arg(long)]
    pub kv_cache: bool,
    /// Images per DiT batch (generate --batch).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanDevice {
    #[value(alias = "gpu")]
    Cuda,
    Cpu,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let spec = match args.config.as_str() {
        "klein-4b" => PipelineSpec::klein_4b(),
        "klein-9b" => PipelineSpec::klein_9b(),
        path => PipelineSpec::from_pipeline(std::path::Path::new(path))?,
    };
    crate::limits::check_reference_count(args.references.len())?;
    crate::limits::check_batch(args.batch)?;
    let references = args
        .references
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (w, h) = r
                .split_once(['x', 'X'])
                .ok_or_else(|| Error::InvalidArgument(format!("--ref {r}: use WIDTHxHEIGHT")))?;
            let parse = |v: &str| {
                v.parse::<usize>().map_err(|_| Error::InvalidArgument(format!("--ref {r}: use WIDTHxHEIGHT")))
            };
            let (w, h) = (parse(w)?, parse(h)?);
            crate::limits::check_reference(i, w, h)?;
            // Planned at the size the pipeline encodes it (area cap, crop).
            Ok(crate::pipeline::reference_size(w, h, spec.vae.pixel_multiple()))
        })
        .collect::<Result<Vec<_>>>()?;
    // The size rule generate applies (multiples of the VAE's pixel multiple, within the maximum).
    let (width, height) =
        crate::pipeline::output_size(Some(args.width), Some(args.height), None, None, spec.vae.pixel_multiple())?;
    let input = PlanInput {
        transformer: spec.transformer,
        text_encoder: spec.text_encoder,
        vae: spec.vae,
        transformer_precision: args.precision,
        encoder_precision: args.text_encoder_precision,
        width,
        height,
        references,
        cfg: args.cfg.unwrap_or(!spec.distilled),
        batch: args.batch,
        kv_cache: (args.kv_cache || spec.kv) && !args.references.is_empty(),
        stored_blocks: spec.stored_blocks.clone(),
        stored_fp8: spec.stored_fp8.clone(),
        budget: match (&args.vram_budget, args.device) {
            (Some(b), _) => planner::parse_bytes(b)?,
            (None, PlanDevice::Cpu) => crate::host_memory::available()
                .map(|a| ((a as f64 * 0.95) as usize).saturating_sub(256 << 20))
                .ok_or_else(|| {
                    Error::InvalidArgument("cannot read the host's available memory; give --budget".into())
                })?,
            (None, PlanDevice::Cuda) => {
                return Err(Error::InvalidArgument("--vram-budget is required for a GPU plan (e.g. 16GiB)".into()))
            }
        },
    };
    let target = match args.device {
        PlanDevice::Cuda => Target::Gpu,
        PlanDevice::Cpu => Target::Cpu(args.cpu_precision),
    };
    let plan = planner::plan_for(&input, target)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan).unwrap());
    } else {
        print!("{}", plan.describe());
    }
    Ok(())
}
