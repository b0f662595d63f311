//! The memory planner: from the component sizes in their precisions, the image size and the
//! budget (VRAM on a GPU, the host's available memory on the CPU), decide what is resident when
//! (spec: text encoder only while encoding, the transformer evicted before VAE decode, tiled
//! decode, block-wise transformer streaming as the last resort) and predict the peak. Sizes are
//! what the target really stores (`Target`). Pure arithmetic: `flux2 plan` runs without a GPU.

pub mod estimate;

use serde::Serialize;

pub use estimate::{EncoderPrecision, TransformerPrecision};

use crate::backend::cpu::CpuPrecision;

use crate::error::{Error, Result};
use crate::model::qwen3::{Qwen3Config, KLEIN_OUT_LAYERS};
use crate::model::transformer::config::TransformerConfig;
use crate::model::vae::VaeConfig;

/// CUDA context, kernel images, allocator slack.
pub const RUNTIME_OVERHEAD: usize = 512 << 20;
/// Smallest VAE decode tile side in pixels (with its 1/4 overlap each way).
pub const MIN_TILE: usize = 256;

#[derive(Debug, Clone)]
pub struct PlanInput {
    pub transformer: TransformerConfig,
    pub text_encoder: Qwen3Config,
    pub vae: VaeConfig,
    pub transformer_precision: TransformerPrecision,
    pub encoder_precision: EncoderPrecision,
    pub width: usize,
    pub height: usize,
    /// Reference images (width, height) after preprocessing.
    pub references: Vec<(usize, usize)>,
    /// Real CFG: two rows per transformer call.
    pub cfg: bool,
    /// Images per DiT batch (`--batch`; 1 normally): every transformer call has this many rows
    /// (twice as many with CFG). Decoding stays one image at a time.
    pub batch: usize,
    /// The reference tokens' K/V are kept for every block (KV variant, `--kv-cache`).
    pub kv_cache: bool,
    pub budget: usize,
    /// Block linears the checkpoint keeps quantized on a GPU (GGUF), with their real sizes.
    pub stored_blocks: estimate::StoredBytes,
    /// Block linears stored as scaled FP8, with their real sizes: what the CPU in bf16 precision
    /// keeps of them (a GPU decodes them to bf16).
    pub stored_fp8: estimate::StoredBytes,
}

/// Where the plan runs, which decides the bytes each component really takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// bf16 weights (fp8 / int8 / int4 as the precisions say) and bf16 activations.
    #[default]
    Gpu,
    /// The CPU backend: f32 activations; weights widened to f32 (`F32`), or kept as stored
    /// (`Bf16`: bf16 in the memory map) except the quantized formats, which it widens to f32.
    Cpu(CpuPrecision),
}

impl Target {
    pub fn describe(self) -> String {
        match self {
            Target::Gpu => "GPU (bf16)".into(),
            Target::Cpu(p) => format!("CPU ({} precision, host memory)", p.name()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformerResidency {
    /// Loaded with everything else and kept (fastest; nothing reloads between images).
    Resident,
    /// Loaded at the start beside the text encoder (both fit while the prompt encodes), then kept
    /// after the encoder is evicted.
    LoadDuringEncode,
    /// Loaded after the text encoder is evicted.
    LoadAfterEncode,
    /// Only `resident_blocks` blocks (plus the small non-block weights) on the device; the rest
    /// uploaded from the memory-mapped checkpoint one at a time at every step.
    StreamBlocks { resident_blocks: usize },
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    /// Component -> bytes held during the phase.
    pub resident: Vec<(String, usize)>,
    pub activations: usize,
    pub peak: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub target: Target,
    pub budget: usize,
    pub peak: usize,
    pub evict_encoder_after_encode: bool,
    pub transformer: TransformerResidency,
    pub evict_transformer_before_decode: bool,
    /// None: decode in one piece; Some(side): tiles of `side` pixels.
    pub decode_tile: Option<usize>,
    pub phases: Vec<Phase>,
    pub weights: Weights,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Weights {
    pub text_encoder: usize,
    pub transformer: usize,
    pub transformer_block: usize,
    pub transformer_non_block: usize,
    pub vae: usize,
    pub context: usize,
    /// The reference K/V cache (KV scheme), held through the denoising loop.
    pub kv_cache: usize,
}

struct Sizes {
    w: Weights,
    enc_act: usize,
    dit_act: usize,
    vae_encode_act: usize,
}

/// The GPU sizes scaled to what `target` stores.
fn sizes(inp: &PlanInput, target: Target) -> Sizes {
    let mut s = gpu_sizes(inp);
    let Target::Cpu(precision) = target else { return s };
    // Activations, the context and the KV cache are f32 on the CPU.
    s.enc_act *= 2;
    s.dit_act *= 2;
    s.vae_encode_act *= 2;
    s.w.context *= 2;
    s.w.kv_cache *= 2;
    // bf16 precision keeps every weight as the GPU does (bf16, fp8 and quantized codes, GGUF
    // blocks; the GEMM dequantizes in its packing): the GPU's sizes.
    if precision == CpuPrecision::Bf16 {
        // ... and the scaled-FP8 layers as their codes (`Backend::keeps_fp8_codes`).
        if !inp.stored_fp8.is_empty() {
            let mut kept = inp.stored_blocks.clone();
            kept.extend(inp.stored_fp8.iter().map(|(k, v)| (k.clone(), *v)));
            let tc = &inp.transformer;
            (s.w.transformer_block, s.w.transformer_non_block) =
                estimate::transformer_block_bytes(tc, inp.transformer_precision, &kept);
            s.w.transformer = estimate::transformer_bytes(tc, inp.transformer_precision, &kept);
        }
        return s;
    }
    // f32 precision widens every weight to f32 at load, quantized ones dequantized: twice the
    // bf16 sizes, whatever the precision flags say.
    let tc = &inp.transformer;
    let layers = *KLEIN_OUT_LAYERS.iter().max().unwrap();
    let none = estimate::StoredBytes::new();
    let (block, rest) = estimate::transformer_block_bytes(tc, TransformerPrecision::Bf16, &none);
    s.w.transformer_block = 2 * block;
    s.w.transformer_non_block = 2 * rest;
    s.w.transformer = 2 * estimate::transformer_bytes(tc, TransformerPrecision::Bf16, &none);
    s.w.text_encoder = 2 * estimate::encoder_bytes(&inp.text_encoder, layers, EncoderPrecision::Bf16);
    s.w.vae = 2 * estimate::vae_bytes(&inp.vae, inp.references.is_empty());
    s
}

fn gpu_sizes(inp: &PlanInput) -> Sizes {
    let layers = *KLEIN_OUT_LAYERS.iter().max().unwrap();
    let tc = &inp.transformer;
    let m = inp.vae.pixel_multiple();
    let tokens_img = (inp.width / m) * (inp.height / m);
    let tokens_ref: usize = inp.references.iter().map(|(w, h)| (w / m) * (h / m)).sum();
    let text = 512;
    let rows = inp.batch.max(1) * if inp.cfg { 2 } else { 1 };
    let (block, rest) = estimate::transformer_block_bytes(tc, inp.transformer_precision, &inp.stored_blocks);
    let context = rows * text * tc.joint_attention_dim * 2 + rows * (tokens_img + tokens_ref) * tc.in_channels * 2 * 3;
    let vae_encode_act =
        inp.references.iter().map(|&(w, h)| estimate::vae_decode_activation_bytes(&inp.vae, w, h)).max().unwrap_or(0);
    Sizes {
        w: Weights {
            text_encoder: estimate::encoder_bytes(&inp.text_encoder, layers, inp.encoder_precision),
            transformer: estimate::transformer_bytes(tc, inp.transformer_precision, &inp.stored_blocks),
            transformer_block: block,
            transformer_non_block: rest,
            vae: estimate::vae_bytes(&inp.vae, inp.references.is_empty()),
            context,
            kv_cache: if inp.kv_cache { estimate::kv_cache_bytes(tc, tokens_ref, rows) } else { 0 },
        },
        enc_act: estimate::encoder_activation_bytes(&inp.text_encoder, text, 1, KLEIN_OUT_LAYERS.len()),
        dit_act: estimate::transformer_activation_bytes(tc, text + tokens_img + tokens_ref, rows),
        vae_encode_act,
    }
}

fn phase(name: &'static str, resident: Vec<(&str, usize)>, activations: usize) -> Phase {
    let peak = RUNTIME_OVERHEAD + resident.iter().map(|(_, b)| b).sum::<usize>() + activations;
    Phase { name, resident: resident.into_iter().map(|(n, b)| (n.to_string(), b)).collect(), activations, peak }
}

/// Tile side (pixels) whose decode fits in `room` bytes, or None if even the smallest does not.
fn decode_tile(vae: &VaeConfig, width: usize, height: usize, room: usize) -> Option<Option<usize>> {
    if estimate::vae_decode_activation_bytes(vae, width, height) <= room {
        return Some(None);
    }
    let m = vae.pixel_multiple();
    let mut side = (width.max(height) / 2 / m) * m;
    while side >= MIN_TILE {
        // A tile decodes side + overlap on each side.
        let span = side + side / 2;
        if estimate::vae_decode_activation_bytes(vae, span, span) <= room {
            return Some(Some(side));
        }
        side = (side / 2 / m) * m;
    }
    None
}

/// The fastest arrangement that fits the budget on a GPU, or an error naming the smallest budget
/// that would work with these precisions.
pub fn plan(inp: &PlanInput) -> Result<Plan> {
    plan_for(inp, Target::Gpu)
}

/// `plan` with the sizes `target` stores.
pub fn plan_for(inp: &PlanInput, target: Target) -> Result<Plan> {
    let s = sizes(inp, target);
    let w = s.w;
    let decode_act = estimate::vae_decode_activation_bytes(&inp.vae, inp.width, inp.height);
    let budget = inp.budget;

    // The KV cache lives through the denoising loop only.
    let with_kv = |mut r: Vec<(&'static str, usize)>| {
        if w.kv_cache > 0 {
            r.push(("kv_cache", w.kv_cache));
        }
        r
    };
    let encode_refs = |extra: Vec<(&'static str, usize)>| {
        let mut r = vec![("vae", w.vae)];
        r.extend(extra);
        phase("encode references", r, s.vae_encode_act)
    };

    // 1. Everything resident.
    let all =
        vec![("text_encoder", w.text_encoder), ("transformer", w.transformer), ("vae", w.vae), ("context", w.context)];
    let phases = vec![
        phase("encode prompt", all.clone(), s.enc_act),
        encode_refs(vec![("text_encoder", w.text_encoder), ("transformer", w.transformer)]),
        phase("denoise", with_kv(all.clone()), s.dit_act),
        phase("decode", all.clone(), decode_act),
    ];
    if let Some(p) = finish(inp, target, &s, phases, false, TransformerResidency::Resident, false, None) {
        return Ok(p);
    }

    // 2./3. Encoder evicted after encoding; the transformer loads during or after encoding.
    let overlap = RUNTIME_OVERHEAD + w.text_encoder + w.transformer + w.vae + w.context + s.enc_act <= budget;
    let (residency, encode_phase) = if overlap {
        (
            TransformerResidency::LoadDuringEncode,
            phase(
                "encode prompt",
                vec![
                    ("text_encoder", w.text_encoder),
                    ("transformer", w.transformer),
                    ("vae", w.vae),
                    ("context", w.context),
                ],
                s.enc_act,
            ),
        )
    } else {
        (
            TransformerResidency::LoadAfterEncode,
            phase(
                "encode prompt",
                vec![("text_encoder", w.text_encoder), ("vae", w.vae), ("context", w.context)],
                s.enc_act,
            ),
        )
    };
    let dit_resident = RUNTIME_OVERHEAD + w.transformer + w.vae + w.context + w.kv_cache + s.dit_act <= budget;
    let (residency, dit_weights) = if dit_resident {
        (residency, w.transformer)
    } else {
        // 4. Block streaming: the non-block weights, as many resident blocks as fit, and room for
        // the one block being streamed.
        let fixed = RUNTIME_OVERHEAD + w.transformer_non_block + w.vae + w.context + w.kv_cache + s.dit_act;
        let slots = budget.saturating_sub(fixed) / w.transformer_block.max(1);
        let total_blocks = inp.transformer.num_layers + inp.transformer.num_single_layers;
        let resident = slots.saturating_sub(1).min(total_blocks);
        let on_device = if resident < total_blocks { resident + 1 } else { resident };
        (
            TransformerResidency::StreamBlocks { resident_blocks: resident },
            w.transformer_non_block + on_device * w.transformer_block,
        )
    };
    let encode_phase = if matches!(residency, TransformerResidency::StreamBlocks { .. }) {
        phase(
            "encode prompt",
            vec![("text_encoder", w.text_encoder), ("vae", w.vae), ("context", w.context)],
            s.enc_act,
        )
    } else {
        encode_phase
    };
    let keep_dit = RUNTIME_OVERHEAD + dit_weights + w.vae + w.context + decode_act <= budget;
    let room = budget.saturating_sub(RUNTIME_OVERHEAD + w.vae + w.context + if keep_dit { dit_weights } else { 0 });
    let tile = decode_tile(&inp.vae, inp.width, inp.height, room).unwrap_or(Some(MIN_TILE));
    let decode_act = match tile {
        None => decode_act,
        Some(side) => estimate::vae_decode_activation_bytes(&inp.vae, side + side / 2, side + side / 2),
    };
    let mut decode_resident = vec![("vae", w.vae), ("context", w.context)];
    if keep_dit {
        decode_resident.push(("transformer", dit_weights));
    }
    let phases = vec![
        encode_phase,
        encode_refs(vec![]),
        phase(
            "denoise",
            with_kv(vec![("transformer", dit_weights), ("vae", w.vae), ("context", w.context)]),
            s.dit_act,
        ),
        phase("decode", decode_resident, decode_act),
    ];
    if let Some(p) = finish(inp, target, &s, phases.clone(), true, residency, !keep_dit, tile) {
        return Ok(p);
    }
    let needed = phases.iter().map(|p| p.peak).max().unwrap_or(0);
    Err(Error::OutOfMemory(format!(
        "a {}x{} image with the {:?} transformer and {:?} text encoder does not fit in {} on the {}: the smallest \
         budget that works is {} (peak phase: {}){}",
        inp.width,
        inp.height,
        inp.transformer_precision,
        inp.encoder_precision,
        gib(budget),
        target.describe(),
        gib(needed.div_ceil(64 << 20) * (64 << 20)),
        phases.iter().max_by_key(|p| p.peak).map_or("", |p| p.name),
        if target == Target::Cpu(CpuPrecision::F32) {
            "; --cpu-precision bf16 keeps the weights in bf16"
        } else if matches!(target, Target::Cpu(_)) {
            ""
        } else if inp.encoder_precision != EncoderPrecision::Int4
            || inp.transformer_precision != TransformerPrecision::Fp8
        {
            "; lower precisions (--precision fp8, --text-encoder-precision int4) need less"
        } else {
            ""
        }
    )))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    inp: &PlanInput,
    target: Target,
    s: &Sizes,
    mut phases: Vec<Phase>,
    evict_encoder: bool,
    transformer: TransformerResidency,
    evict_transformer: bool,
    decode_tile: Option<usize>,
) -> Option<Plan> {
    if inp.references.is_empty() {
        phases.retain(|p| p.name != "encode references");
    }
    let peak = phases.iter().map(|p| p.peak).max().unwrap_or(0);
    (peak <= inp.budget).then(|| Plan {
        target,
        budget: inp.budget,
        peak,
        evict_encoder_after_encode: evict_encoder,
        transformer,
        evict_transformer_before_decode: evict_transformer,
        decode_tile,
        phases,
        weights: s.w,
    })
}

pub fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// "16GiB", "16 GB", "12000MiB", "8G", or plain bytes.
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_lowercase().replace(' ', "");
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 =
        num.parse().map_err(|_| Error::InvalidArgument(format!("cannot read `{s}` as a size (e.g. 16GiB)")))?;
    let mult: f64 = match unit {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1048576.0,
        "mb" => 1e6,
        "g" | "gib" => 1073741824.0,
        "gb" => 1e9,
        "t" | "tib" => 1099511627776.0,
        "tb" => 1e12,
        _ => return Err(Error::InvalidArgument(format!("unknown size unit in `{s}` (use GiB, GB, MiB, MB)"))),
    };
    Ok((v * mult) as usize)
}

impl Plan {
    pub fn describe(&self) -> String {
        let mut s =
            format!("{}: budget {}, predicted peak {}\n", self.target.describe(), gib(self.budget), gib(self.peak));
        s.push_str(&format!(
            "text encoder: {}\ntransformer: {}\nVAE decode: {}\n",
            if self.evict_encoder_after_encode { "evicted after encoding" } else { "kept resident" },
            match self.transformer {
                TransformerResidency::Resident => "resident with everything else".to_string(),
                TransformerResidency::LoadDuringEncode => "loaded at the start beside the text encoder".to_string(),
                TransformerResidency::LoadAfterEncode => "loaded after the text encoder is evicted".to_string(),
                TransformerResidency::StreamBlocks { resident_blocks } => {
                    format!("block streaming from host memory, {resident_blocks} blocks resident")
                }
            } + if self.evict_transformer_before_decode { "; evicted before VAE decode" } else { "" },
            match self.decode_tile {
                None => "one piece".to_string(),
                Some(t) => format!("tiled, {t}x{t} pixel tiles"),
            }
        ));
        s.push_str(&format!(
            "weights: text encoder {}, transformer {}, VAE {}\n",
            gib(self.weights.text_encoder),
            gib(self.weights.transformer),
            gib(self.weights.vae)
        ));
        for p in &self.phases {
            let held: Vec<String> = p.resident.iter().map(|(n, b)| format!("{n} {}", gib(*b))).collect();
            s.push_str(&format!(
                "  {:<18} peak {:>10}  activations {:>10}  [{}]\n",
                p.name,
                gib(p.peak),
                gib(p.activations),
                held.join(", ")
            ));
        }
        s
    }
}
