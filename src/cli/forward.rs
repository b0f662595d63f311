//! `flux2 forward <component>`: run one component on tensors from a safetensors file, for
//! component-by-component comparison with the Python reference.

use std::path::PathBuf;

use super::{expect_rank, read_f32, write_f32};
use crate::backend::cpu::CpuPrecision;
use crate::device::{self, DeviceChoice};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::component_dir;
use crate::model::qwen3::{Qwen3Config, Qwen3TextEncoder, KLEIN_OUT_LAYERS};
use crate::model::rope::PositionIds;
use crate::model::tokenizer::TokenizedPrompt;
use crate::model::transformer::{scale_in_dtype, AttentionMode, Compute, Flux2Transformer};
use crate::model::vae::{patchify, Vae, VaeParts};
use crate::planner::{EncoderPrecision, TransformerPrecision};
use crate::sampler::TimestepMode;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Component {
    /// Flux2Transformer2DModel.forward: hidden_states, encoder_hidden_states, timestep, img_ids,
    /// txt_ids (+ optional guidance) -> sample.
    Transformer,
    /// Qwen3 text encoder: input_ids [B, L], attention_mask [B, L] -> prompt_embeds [B, L, 3·hidden]
    /// (hidden states 9, 18, 27 per token, as the klein pipeline builds them).
    TextEncoder,
    /// VAE encoder: image [B, 3, H, W] in [-1, 1] -> latent (the distribution's mode) and
    /// image_latents (patchified and BatchNorm-normalised, what the pipeline feeds the transformer).
    VaeEncode,
    /// VAE decoder: latents [B, z, h, w] -> sample [B, 3, 8h, 8w]. Latents with 4·z channels are
    /// taken as the pipeline's normalised, patchified latents and denormalised first.
    VaeDecode,
}

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Which component to run.
    #[arg(value_enum)]
    pub component: Component,
    /// A diffusers pipeline folder, the component's folder, or a single-file checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Input tensors (safetensors), named as the diffusers forward arguments.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the output tensors (safetensors, f32).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU backend only: bf16 keeps the weights as stored (bf16/f16/fp8, in the memory map) and
    /// runs bf16 GEMMs; f32 widens every weight (the exact reference).
    #[arg(long, value_enum, default_value_t = CpuPrecision::F32)]
    pub cpu_precision: CpuPrecision,
    /// Transformer only: block linears in bf16 or fp8 (W8A8).
    #[arg(long, value_enum, default_value_t = TransformerPrecision::Bf16)]
    pub precision: TransformerPrecision,
    /// Transformer only: exact or sage attention.
    #[arg(long, value_enum, default_value_t = AttentionMode::Exact)]
    pub attention: AttentionMode,
    /// Transformer only: the dtype `timestep · 1000` (and guidance) is computed in, as in
    /// `generate`: diffusers (the compute dtype), diffusers-f32 (to compare with float32
    /// references), diffusers-bf16 or bfl (bf16).
    #[arg(long, value_enum, default_value_t = TimestepMode::Diffusers)]
    pub timesteps: TimestepMode,
    /// Text encoder only: storage of its linears (bf16, fp8, int8, int4).
    #[arg(long, value_enum, default_value_t = EncoderPrecision::Bf16)]
    pub text_encoder_precision: EncoderPrecision,
    /// Transformer only: LoRA files, `FILE[:SCALE]` (repeatable), as in `generate`.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = crate::cli::generate::parse_lora)]
    pub loras: Vec<crate::lora::LoraSpec>,
    #[arg(long, value_enum, default_value_t = crate::lora::LoraMode::Merge)]
    pub lora_mode: crate::lora::LoraMode,
}

pub fn run(args: &ForwardArgs) -> Result<()> {
    if !args.loras.is_empty() && !matches!(args.component, Component::Transformer) {
        return Err(Error::InvalidArgument("--lora applies to the transformer only".into()));
    }
    let be = device::select_with(args.device, args.cpu_precision)?;
    let inputs = WeightStore::open(&args.inputs)?;
    match args.component {
        Component::Transformer => {
            let compute = Compute { precision: Some(args.precision), attention: args.attention };
            let loras = crate::lora::LoraOptions { loras: args.loras.clone(), mode: args.lora_mode };
            let model = Flux2Transformer::load_with_loras(be.clone(), &args.model, None, compute, &loras)?;
            let x = read_f32(&inputs, "hidden_states")?;
            let ctx = read_f32(&inputs, "encoder_hidden_states")?;
            expect_rank("hidden_states", &x, &[3])?;
            expect_rank("encoder_hidden_states", &ctx, &[3])?;
            let sigma = read_f32(&inputs, "timestep")?.to_vec_f32()?;
            let guidance =
                if inputs.contains("guidance") { Some(read_f32(&inputs, "guidance")?.to_vec_f32()?) } else { None };
            let img_ids = ids(&inputs, "img_ids")?;
            let txt_ids = ids(&inputs, "txt_ids")?;
            let act = be.activation_dtype();
            // diffusers multiplies timestep and guidance by 1000 in the model dtype.
            let time_dtype = match args.timesteps {
                TimestepMode::Diffusers => act,
                TimestepMode::DiffusersF32 => DType::F32,
                TimestepMode::DiffusersBf16 | TimestepMode::Bfl => DType::BF16,
            };
            let t = scale_in_dtype(&sigma, 1000.0, time_dtype);
            let g = guidance.map(|g| scale_in_dtype(&g, 1000.0, time_dtype));
            let out =
                model.forward(&be.upload(&x, act)?, &be.upload(&ctx, act)?, &t, &img_ids, &txt_ids, g.as_deref())?;
            write_f32(&args.out, &[("sample", &out)])
        }
        Component::TextEncoder => {
            let dir = component_dir(&args.model, "text_encoder");
            // The inputs are checked against the config before the (long) weight loading.
            let vocab = Qwen3Config::from_json_file(&dir.join("config.json"))?.vocab_size;
            let (ids, shape) = token_ids(&inputs, "input_ids", vocab)?;
            if shape.len() != 2 {
                return Err(Error::InvalidArgument(format!(
                    "input `input_ids` has shape {shape:?}; expected rank [2]"
                )));
            }
            let mask = if inputs.contains("attention_mask") {
                let mask = read_f32(&inputs, "attention_mask")?;
                if mask.shape() != shape {
                    return Err(Error::InvalidArgument(format!(
                        "input `attention_mask` has shape {:?}; `input_ids` is {shape:?}",
                        mask.shape(),
                    )));
                }
                mask.to_vec_f32()?
            } else {
                vec![1.0; ids.len()]
            };
            let encoder =
                Qwen3TextEncoder::load_with(be.clone(), &dir, &KLEIN_OUT_LAYERS, args.text_encoder_precision)?;
            let l = shape[1];
            let rows = (0..ids.len() / l.max(1))
                .map(|r| {
                    let ids = ids[r * l..(r + 1) * l].to_vec();
                    let mask: Vec<u8> = mask[r * l..(r + 1) * l].iter().map(|&m| (m != 0.0) as u8).collect();
                    let length = mask.iter().filter(|&&m| m != 0).count();
                    TokenizedPrompt { ids, mask, length, untruncated_length: length }
                })
                .collect::<Vec<_>>();
            let out = encoder.forward(&rows)?;
            write_f32(&args.out, &[("prompt_embeds", &out)])
        }
        Component::VaeEncode => {
            let vae =
                Vae::load(be.clone(), &component_dir(&args.model, "vae"), VaeParts { encoder: true, decoder: false })?;
            let image = read_f32(&inputs, "image")?;
            expect_rank("image", &image, &[4])?;
            let latent = vae.encode(&be.upload(&image, be.activation_dtype())?)?;
            let normalized = vae.normalize(&patchify(&*be, &latent)?)?;
            write_f32(&args.out, &[("latent", &latent), ("image_latents", &normalized)])
        }
        Component::VaeDecode => {
            let vae =
                Vae::load(be.clone(), &component_dir(&args.model, "vae"), VaeParts { encoder: false, decoder: true })?;
            let z = read_f32(&inputs, "latents")?;
            expect_rank("latents", &z, &[4])?;
            let z = be.upload(&z, be.activation_dtype())?;
            let sample =
                if z.dim(1) == vae.config().packed_channels() { vae.decode_normalized(&z)? } else { vae.decode(&z)? };
            write_f32(&args.out, &[("sample", &sample)])
        }
    }
}

/// Position ids as `[L, axes]`, or `[B, L, axes]` of which the first is used (as diffusers does).
fn ids(store: &WeightStore, name: &str) -> Result<PositionIds> {
    let t: Tensor = read_f32(store, name)?;
    expect_rank(name, &t, &[2, 3])?;
    let t = if t.rank() == 3 { t.narrow(0, 0, 1)?.reshape(&t.shape()[1..])? } else { t };
    PositionIds::new(t.dim(1), t.to_vec_f32()?).map_err(|e| Error::InvalidArgument(format!("`{name}`: {e}")))
}

/// Token ids, read exactly from any integer dtype (or from floats holding whole numbers) and
/// checked against the vocabulary: a cast would turn -1 into 4294967295 or 2^40 into a
/// saturated id, and an id past the embedding table must not reach the lookup.
pub fn token_ids(store: &WeightStore, name: &str, vocab: usize) -> Result<(Vec<u32>, Vec<usize>)> {
    let t = store.get(name)?;
    let le = |c: &[u8]| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        b
    };
    let signed = |c: &[u8], bits: u32| {
        let shift = 64 - bits;
        ((i64::from_le_bytes(le(c)) << shift) >> shift) as f64
    };
    let values: Vec<f64> = match t.stored_dtype.as_str() {
        "I64" => t.bytes.chunks_exact(8).map(|c| signed(c, 64)).collect(),
        "I32" => t.bytes.chunks_exact(4).map(|c| signed(c, 32)).collect(),
        "I16" => t.bytes.chunks_exact(2).map(|c| signed(c, 16)).collect(),
        "I8" => t.bytes.iter().map(|&b| b as i8 as f64).collect(),
        "U64" => t.bytes.chunks_exact(8).map(|c| u64::from_le_bytes(le(c)) as f64).collect(),
        "U32" | "U16" | "U8" => {
            let n = crate::weights::safetensors::dtype_bits(&t.stored_dtype).unwrap_or(8) / 8;
            t.bytes.chunks_exact(n).map(|c| u64::from_le_bytes(le(c)) as f64).collect()
        }
        "F64" => t.bytes.chunks_exact(8).map(|c| f64::from_le_bytes(le(c))).collect(),
        _ => t.to_f32()?.into_iter().map(f64::from).collect(),
    };
    let ids = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            // Exact for every id below 2^53, far beyond any vocabulary.
            if v.fract() == 0.0 && v >= 0.0 && v < vocab.min(1 << 32) as f64 {
                Ok(v as u32)
            } else {
                Err(Error::InvalidArgument(format!(
                    "input `{name}` holds {v} at position {i}; token ids must be whole numbers from 0 to {} \
                     (the vocabulary size is {vocab})",
                    vocab.saturating_sub(1)
                )))
            }
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok((ids, t.shape().to_vec()))
}
