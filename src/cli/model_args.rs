//! Where the model comes from, shared by every command that runs the whole pipeline: a diffusers
//! folder (`--model`), separate component files (`--transformer`, `--text-encoder`, `--vae`, as
//! ComfyUI and stable-diffusion.cpp users keep them), or a folder with some components replaced.

use std::path::PathBuf;

use crate::error::Result;
use crate::pipeline::{ComponentFiles, PipelineInfo};

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A diffusers-layout pipeline folder, or a Hugging Face repo id in the local cache
    /// (e.g. black-forest-labs/FLUX.2-klein-4B). Optional when --transformer, --text-encoder and
    /// --vae are all given.
    #[arg(long)]
    pub model: Option<String>,
    /// The transformer as one file or folder (BFL or diffusers names; bf16/fp8 safetensors,
    /// ComfyUI fp8/nvfp4/int8 files, GGUF); replaces the one in --model.
    #[arg(long)]
    pub transformer: Option<PathBuf>,
    /// The Qwen3 text encoder as one file or folder (Hugging Face names, e.g. ComfyUI's
    /// qwen_3_4b.safetensors, or a llama.cpp GGUF); replaces the one in --model.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// The VAE as one file or folder (diffusers names, or BFL's ae.safetensors / flux2-vae);
    /// replaces the one in --model.
    #[arg(long)]
    pub vae: Option<PathBuf>,
}

impl ModelArgs {
    /// The components to load (the tokenizer is the folder's, else the built-in Qwen3 one).
    pub fn resolve(&self) -> Result<PipelineInfo> {
        let root = self.model.as_deref().map(crate::hub::resolve_model).transpose()?;
        let files = ComponentFiles {
            transformer: self.transformer.clone(),
            text_encoder: self.text_encoder.clone(),
            vae: self.vae.clone(),
        };
        PipelineInfo::assemble(root.as_deref(), &files)
    }

    /// How reports and PNG metadata name the model: --model, else the transformer file.
    pub fn describe(&self) -> String {
        match (&self.model, &self.transformer) {
            (Some(m), _) => m.clone(),
            (None, Some(t)) => t.display().to_string(),
            (None, None) => String::new(),
        }
    }
}
