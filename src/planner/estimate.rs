//! Byte estimates of weights and activations, from configs and precisions alone (no GPU).

use crate::model::qwen3::{self, Qwen3Config};
use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::layout::diffusers_tensors;
use crate::model::vae::{self, VaeConfig};

// The precision enums live with the formats (low in the crate): model code reads them too.
pub use crate::quant::{EncoderPrecision, TransformerPrecision, INT4_GROUP};

/// Bytes of a `[rows, cols]` linear weight in a quantized format (codes + f32 scales), as
/// `quant::quantize` stores it.
pub fn linear_bytes(rows: usize, cols: usize, p: EncoderPrecision) -> usize {
    match crate::model::linear::format_for(p) {
        None => rows * cols * 2,
        Some(f) => {
            let f = f.for_cols(cols).unwrap_or(f);
            f.code_bytes(rows, cols) + f.scale_count(rows, cols) * 4
        }
    }
}

/// The block a transformer tensor belongs to (`transformer_blocks.3`), if any.
fn block_of(name: &str) -> Option<&str> {
    if !(name.starts_with("transformer_blocks.") || name.starts_with("single_transformer_blocks.")) {
        return None;
    }
    let second_dot = name.match_indices('.').nth(1).map_or(name.len(), |(i, _)| i);
    Some(&name[..second_dot])
}

/// Device bytes of block linears a checkpoint keeps as stored (GGUF blocks the weight-only GEMM
/// reads), by diffusers name; tensors not listed take what the precision says.
pub type StoredBytes = std::collections::BTreeMap<String, usize>;

/// Device bytes of one transformer tensor: block linears in the chosen precision (or as stored,
/// for bf16 compute on a GGUF checkpoint), the rest bf16.
fn transformer_tensor_bytes(name: &str, shape: &[usize], p: TransformerPrecision, stored: &StoredBytes) -> usize {
    let block_linear = shape.len() == 2 && block_of(name).is_some();
    match (p, block_linear) {
        (TransformerPrecision::Fp8, true) => linear_bytes(shape[0], shape[1], EncoderPrecision::Fp8),
        (TransformerPrecision::Bf16, true) if stored.contains_key(name) => stored[name],
        _ => shape.iter().product::<usize>() * 2,
    }
}

/// Device bytes of the transformer weights.
pub fn transformer_bytes(cfg: &TransformerConfig, p: TransformerPrecision, stored: &StoredBytes) -> usize {
    diffusers_tensors(cfg).iter().map(|t| transformer_tensor_bytes(&t.name, &t.shape, p, stored)).sum()
}

/// Device bytes of the largest transformer block (the unit block streaming uploads), and of
/// everything outside the blocks.
pub fn transformer_block_bytes(
    cfg: &TransformerConfig,
    p: TransformerPrecision,
    stored: &StoredBytes,
) -> (usize, usize) {
    let mut blocks = std::collections::BTreeMap::<String, usize>::new();
    let mut rest = 0;
    for t in diffusers_tensors(cfg) {
        let bytes = transformer_tensor_bytes(&t.name, &t.shape, p, stored);
        match block_of(&t.name) {
            Some(block) => *blocks.entry(block.to_string()).or_default() += bytes,
            None => rest += bytes,
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

/// Bytes of the KV scheme's reference cache: post-RoPE K and V of `ref_tokens` tokens for
/// `rows` rows at every block (double and single), bf16.
pub fn kv_cache_bytes(cfg: &TransformerConfig, ref_tokens: usize, rows: usize) -> usize {
    (cfg.num_layers + cfg.num_single_layers) * 2 * rows * ref_tokens * cfg.hidden() * 2
}

/// Peak activation bytes of encoding `batch` prompts of `tokens` tokens.
pub fn encoder_activation_bytes(cfg: &Qwen3Config, tokens: usize, batch: usize, out_layers: usize) -> usize {
    let h = cfg.hidden_size;
    let qkv = (cfg.num_attention_heads + 2 * cfg.kv_heads()) * cfg.head_dim();
    batch * tokens * (6 * h + 2 * qkv + 3 * cfg.intermediate_size + out_layers * h) * 2
}

/// Scratch of the GPU convolution (backend/cuda/conv.rs): the weights of the widest 3x3 conv
/// repacked for the implicit GEMM (no column buffer).
fn conv_scratch_bytes(channels: usize) -> usize {
    channels * 9 * channels.next_multiple_of(32) * 2
}

/// Peak activation bytes of decoding a `width × height` image: at the largest resolution, a
/// ResNet holds its input, the normalised input and the conv output, plus the conv scratch.
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
    peak.max(latent * rev[0] * 6 * 2) + conv_scratch_bytes(rev[0])
}
