//! `flux2 synth`: write a random-weight checkpoint with the real names and shapes.

use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::qwen3::Qwen3Config;
use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::layout::Layout;
use crate::model::vae::VaeConfig;
use crate::synth::{
    available_space, ensure_space, human_bytes, pipeline_bytes, require_keys, transformer_bytes, PipelineSpec,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutChoice {
    Diffusers,
    Bfl,
}

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// `klein-4b` or `klein-9b` (a whole pipeline in the diffusers layout: Qwen3 text encoder,
    /// transformer, VAE, scheduler, tokenizer), a pipeline folder (same, with its configs), or a
    /// transformer config.json (the transformer alone).
    #[arg(long)]
    pub config: String,
    /// diffusers folders, or BFL's single transformer file.
    #[arg(long, value_enum, default_value_t = LayoutChoice::Diffusers)]
    pub layout: LayoutChoice,
    /// Storage dtype: bf16, f16, f32 or fp8.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A tokenizer folder to copy into the pipeline (default: a byte-level stand-in).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

enum Target {
    Pipeline(PipelineSpec, String),
    Transformer(TransformerConfig, String),
}

fn resolve(name: &str) -> Result<Target> {
    match name {
        "klein-4b" => Ok(Target::Pipeline(PipelineSpec::klein_4b(), "flux-2-klein-4b".into())),
        "klein-9b" => Ok(Target::Pipeline(PipelineSpec::klein_9b(), "flux-2-klein-9b".into())),
        path => {
            let p = Path::new(path);
            if p.is_dir() && p.join("model_index.json").is_file() {
                require_keys(&p.join("transformer/config.json"), TransformerConfig::SHAPE_KEYS)?;
                require_keys(&p.join("text_encoder/config.json"), Qwen3Config::SHAPE_KEYS)?;
                require_keys(&p.join("vae/config.json"), VaeConfig::SHAPE_KEYS)?;
                Ok(Target::Pipeline(PipelineSpec::from_pipeline(p)?, "transformer".into()))
            } else if p.is_file() {
                require_keys(p, TransformerConfig::SHAPE_KEYS)?;
                Ok(Target::Transformer(TransformerConfig::from_json_file(p)?, "transformer".into()))
            } else {
                Err(Error::InvalidArgument(format!(
                    "--config {path}: not klein-4b, klein-9b, a pipeline folder or an existing config.json"
                )))
            }
        }
    }
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let dtype = DType::parse(&args.dtype)
        .ok_or_else(|| Error::InvalidArgument(format!("--dtype {}: use bf16, f16, f32 or fp8", args.dtype)))?;
    let target = resolve(&args.config)?;
    let layout = if args.layout == LayoutChoice::Bfl { Layout::Bfl } else { Layout::Diffusers };
    let needed = match (&target, layout) {
        (Target::Pipeline(spec, _), Layout::Diffusers) => pipeline_bytes(spec, dtype, args.tokenizer.as_deref()),
        // Configs reach here validated (from_json_file, or built in).
        (Target::Pipeline(PipelineSpec { transformer: cfg, .. }, _) | Target::Transformer(cfg, _), layout) => {
            transformer_bytes(cfg, layout, dtype)
        }
    };
    let free = available_space(&args.out);
    // Stderr: stdout lists the written files, one a line, for scripts.
    eprintln!(
        "synth: writing about {} into {}{}",
        human_bytes(needed),
        args.out.display(),
        free.map(|f| format!(" ({} free)", human_bytes(f))).unwrap_or_default()
    );
    ensure_space(&args.out, needed, free)?;
    let written = match (target, args.layout) {
        (Target::Pipeline(spec, _), LayoutChoice::Diffusers) => {
            crate::synth::write_pipeline(&spec, dtype, args.seed, &args.out, args.tokenizer.as_deref())?
        }
        (Target::Pipeline(PipelineSpec { transformer: cfg, .. }, stem) | Target::Transformer(cfg, stem), layout) => {
            let layout = if layout == LayoutChoice::Bfl { Layout::Bfl } else { Layout::Diffusers };
            crate::synth::write_transformer(&cfg, layout, dtype, args.seed, &args.out, &format!("{stem}.safetensors"))?
        }
    };
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}
