//! Byte estimates of weights and activations, from configs and precisions alone (no GPU).

use crate::model::qwen3::{self, Qwen3Config};
use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::layout::diffusers_tensors;
use crate::model::vae::{self, VaeConfig};

/// Storage of the transformer's block linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum TransformerPrecision {
    Bf16,
    /// FP8 e4m3 block linears with per-output-channel f32 scales; embedders, modulation and the
    /// final layer stay bf16 (as the official FP8 releases do).
    Fp8,
}

/// Storage of the text encoder's linears (embeddings stay bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum EncoderPrecision {
    Bf16,
    Fp8,
    /// int8 per output channel, f32 scales.
    Int8,
    /// 4-bit groups of 64 along the input dim, f32 scales.
    Int4,
}

pub const INT4_GROUP: usize = 64;

/// Bytes of a `[rows, cols]` linear weight in a quantized format (values + scales).
pub fn linear_bytes(rows: usize, cols: usize, p: EncoderPrecision) -> usize {
    match p {
        EncoderPrecision::Bf16 => rows * cols * 2,
        EncoderPrecision::Fp8 | EncoderPrecision::Int8 => rows * cols + rows * 4,
        EncoderPrecision::Int4 => rows * cols.div_ceil(2) + rows * cols.div_ceil(INT4_GROUP) * 4,
    }
}

fn is_block_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && (name.starts_with("transformer_blocks.") || name.starts_with("single_transformer_blocks."))
}

/// Device bytes of the transformer weights.
pub fn transformer_bytes(cfg: &TransformerConfig, p: TransformerPrecision) -> usize {
    diffusers_tensors(cfg)
        .iter()
        .map(|t| match (p, is_block_linear(&t.name, &t.shape)) {
            (TransformerPrecision::Fp8, true) => linear_bytes(t.shape[0], t.shape[1], EncoderPrecision::Fp8),
            _ => t.numel() * 2,
        })
        .sum()
}

/// Device bytes of the largest transformer block (what block streaming double-buffers).
pub fn transformer_block_bytes(cfg: &TransformerConfig, p: TransformerPrecision) -> (usize, usize) {
    let mut blocks = std::collections::BTreeMap::<String, usize>::new();
    let mut rest = 0;
    for t in diffusers_tensors(cfg) {
        let bytes = match (p, is_block_linear(&t.name, &t.shape)) {
            (TransformerPrecision::Fp8, true) => linear_bytes(t.shape[0], t.shape[1], EncoderPrecision::Fp8),
            _ => t.numel() * 2,
        };
        let parts: Vec<&str> = t.name.splitn(3, '.').collect();
        if t.name.starts_with("transformer_blocks.") || t.name.starts_with("single_transformer_blocks.") {
            *blocks.entry(format!("{}.{}", parts[0], parts[1])).or_default() += bytes;
        } else {
            rest += bytes;
        }
    }
    (blocks.values().copied().max().unwrap_or(0), rest)
}

/// Device bytes of the text encoder as klein runs it: embeddings plus the first `layers` layers.
pub fn encoder_bytes(cfg: &Qwen3Config, layers: usize, p: EncoderPrecision) -> usize {
    qwen3::tensors(cfg)
        .iter()
        .filter(|t| match t.name.strip_prefix("model.layers.") {
            Some(rest) => rest.split('.').next().and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n < layers),
            None => t.name == "model.embed_tokens.weight",
        })
        .map(|t| {
            if t.shape.len() == 2 && t.name.contains("layers.") {
                linear_bytes(t.shape[0], t.shape[1], p)
            } else {
                t.numel() * 2
            }
        })
        .sum()
}

pub fn vae_bytes(cfg: &VaeConfig, decoder_only: bool) -> usize {
    vae::tensors(cfg)
        .iter()
        .filter(|t| !decoder_only || !(t.name.starts_with("encoder.") || t.name.starts_with("quant_conv")))
        .map(|t| t.numel() * 2)
        .sum()
}

/// Peak activation bytes of one DiT forward over `tokens` (text + image) for `batch` rows: the
/// single-stream block's fused projection and its consumers dominate.
pub fn transformer_activation_bytes(cfg: &TransformerConfig, tokens: usize, batch: usize) -> usize {
    let (d, m) = (cfg.hidden(), cfg.mlp_hidden());
    batch * tokens * ((3 * d + 2 * m) + 2 * (d + m) + 8 * d) * 2
}

/// Peak activation bytes of encoding `batch` prompts of `tokens` tokens.
pub fn encoder_activation_bytes(cfg: &Qwen3Config, tokens: usize, batch: usize, out_layers: usize) -> usize {
    let h = cfg.hidden_size;
    let qkv = (cfg.num_attention_heads + 2 * cfg.kv_heads()) * cfg.head_dim();
    batch * tokens * (6 * h + 2 * qkv + 3 * cfg.intermediate_size + out_layers * h) * 2
}

/// im2col buffer of the GPU convolution (see backend/cuda/gemm.rs).
pub const CONV_COLUMN_BYTES: usize = 256 << 20;

/// Peak activation bytes of decoding a `width × height` image: at the largest resolution, a
/// ResNet holds its input, the normalised input, the conv output and the column buffer.
pub fn vae_decode_activation_bytes(cfg: &VaeConfig, width: usize, height: usize) -> usize {
    let levels = cfg.block_out_channels.len();
    let rev: Vec<usize> = cfg.decoder_channels().iter().rev().copied().collect();
    let f = cfg.scale_factor();
    let mut peak = 0;
    let mut cin = rev[0];
    for (k, &cout) in rev.iter().enumerate() {
        // Level k runs at 1/f · 2^k of the image side; its upsampler doubles it.
        let side = 1usize << k;
        let pixels = (width / f * side) * (height / f * side);
        peak = peak.max(pixels * (2 * cin + 2 * cout) * 2);
        if k + 1 < levels {
            peak = peak.max(pixels * 4 * (2 * cout) * 2); // the upsampled tensor and its conv output
        }
        cin = cout;
    }
    // Mid-block attention over every latent pixel: q, k, v, output of the top width.
    let latent = (width / f) * (height / f);
    peak.max(latent * rev[0] * 6 * 2) + CONV_COLUMN_BYTES
}
