//! `flux2 synth`: write a random-weight checkpoint with the real names and shapes.

use std::path::PathBuf;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::layout::Layout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutChoice {
    Diffusers,
    Bfl,
}

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// `klein-4b`, `klein-9b`, or a transformer config.json.
    #[arg(long)]
    pub config: String,
    #[arg(long, value_enum, default_value_t = LayoutChoice::Diffusers)]
    pub layout: LayoutChoice,
    /// Storage dtype: bf16, f16, f32 or fp8.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// A built-in config name or a config.json path.
pub fn resolve_config(name: &str) -> Result<(TransformerConfig, String)> {
    match name {
        "klein-4b" => Ok((TransformerConfig::klein_4b(), "flux-2-klein-4b".into())),
        "klein-9b" => Ok((TransformerConfig::klein_9b(), "flux-2-klein-9b".into())),
        path => {
            let p = PathBuf::from(path);
            if !p.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "--config {path}: not klein-4b, klein-9b or an existing config.json"
                )));
            }
            Ok((TransformerConfig::from_json_file(&p)?, "transformer".into()))
        }
    }
}

pub fn run(args: &SynthArgs) -> Result<()> {
    let (cfg, stem) = resolve_config(&args.config)?;
    let dtype = DType::parse(&args.dtype)
        .ok_or_else(|| Error::InvalidArgument(format!("--dtype {}: use bf16, f16, f32 or fp8", args.dtype)))?;
    let layout = match args.layout {
        LayoutChoice::Diffusers => Layout::Diffusers,
        LayoutChoice::Bfl => Layout::Bfl,
    };
    let written =
        crate::synth::write_transformer(&cfg, layout, dtype, args.seed, &args.out, &format!("{stem}.safetensors"))?;
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}
