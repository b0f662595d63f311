//! The FLUX.2 DiT (`Flux2Transformer2DModel`, spec §3): shared adaLN modulation, double-stream
//! blocks over separate image/text weights with joint attention (text first), single-stream
//! parallel blocks, then the final adaLN and projection.

pub mod config;
pub mod layout;
mod step_graph;

use std::path::Path;
use std::sync::Arc;

use self::config::TransformerConfig;
use self::layout::{Layout, TransformerWeights};
use super::linear::Linear;
use super::rope::{flux_tables, PositionIds};
use crate::backend::{scope, swiglu_beside, AttnMask, Backend, GatedFp8, QkPart, QkRope, RopePairs};
use crate::dtype::{round_through, DType};
use crate::error::{Error, Result};
use crate::lora::runtime::LowRank;
use crate::lora::{AdapterSet, LoraMode, LoraOptions};
use crate::quant::{Quantized, TransformerPrecision};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

pub use self::step_graph::{StepGraph, Steps};

/// Where a transformer lives: a diffusers pipeline folder, its `transformer/` folder, or one
/// BFL-layout `.safetensors` file. Returns the weight store and, for diffusers, the config path.
pub fn locate(path: &Path) -> Result<(WeightStore, Option<std::path::PathBuf>)> {
    if path.is_dir() {
        let dir = super::component_dir(path, "transformer");
        let config = dir.join("config.json");
        let store = WeightStore::open(&dir)?;
        return Ok((store, config.is_file().then_some(config)));
    }
    Ok((WeightStore::open(path)?, None))
}

/// A transformer's weights, layout and config (config.json of a diffusers folder, else read off
/// the shapes of a single file: BFL names, diffusers names, GGUF, ComfyUI quantized files).
pub fn open(path: &Path) -> Result<(WeightStore, Layout, TransformerConfig)> {
    let (mut store, config_path) = locate(path)?;
    let layout = Layout::detect(&mut store)?;
    let cfg = TransformerConfig::resolve(&store, layout, config_path.as_deref())?;
    Ok((store, layout, cfg))
}

fn load_double(
    w: &TransformerWeights,
    b: &dyn Backend,
    cfg: &TransformerConfig,
    mode: BlockLinears,
    rt: Option<&AdapterSet>,
    i: usize,
) -> Result<DoubleBlock> {
    let (d, m, hd) = (cfg.hidden(), cfg.mlp_hidden(), cfg.attention_head_dim);
    let p = |s: &str| format!("transformer_blocks.{i}.{s}");
    let qkv = |names: [&str; 3]| {
        let full: Vec<String> = names.iter().map(|n| p(&format!("attn.{n}.weight"))).collect();
        block_linear(w, b, mode, rt, &full.iter().map(String::as_str).collect::<Vec<_>>(), &[d, d])
    };
    let lin = |name: &str, shape: &[usize]| block_linear(w, b, mode, rt, &[&p(name)], shape);
    Ok(DoubleBlock {
        img_qkv: qkv(["to_q", "to_k", "to_v"])?,
        txt_qkv: qkv(["add_q_proj", "add_k_proj", "add_v_proj"])?,
        norm_q: w.load(b, &p("attn.norm_q.weight"), &[hd])?,
        norm_k: w.load(b, &p("attn.norm_k.weight"), &[hd])?,
        norm_added_q: w.load(b, &p("attn.norm_added_q.weight"), &[hd])?,
        norm_added_k: w.load(b, &p("attn.norm_added_k.weight"), &[hd])?,
        to_out: lin("attn.to_out.0.weight", &[d, d])?,
        to_add_out: lin("attn.to_add_out.weight", &[d, d])?,
        ff_in: lin("ff.linear_in.weight", &[2 * m, d])?,
        ff_out: lin("ff.linear_out.weight", &[d, m])?,
        ff_ctx_in: lin("ff_context.linear_in.weight", &[2 * m, d])?,
        ff_ctx_out: lin("ff_context.linear_out.weight", &[d, m])?,
    })
}

fn load_single(
    w: &TransformerWeights,
    b: &dyn Backend,
    cfg: &TransformerConfig,
    mode: BlockLinears,
    rt: Option<&AdapterSet>,
    i: usize,
) -> Result<SingleBlock> {
    let (d, m, hd) = (cfg.hidden(), cfg.mlp_hidden(), cfg.attention_head_dim);
    let p = |s: &str| format!("single_transformer_blocks.{i}.attn.{s}");
    Ok(SingleBlock {
        qkv_mlp: block_linear(w, b, mode, rt, &[&p("to_qkv_mlp_proj.weight")], &[3 * d + 2 * m, d])?,
        norm_q: w.load(b, &p("norm_q.weight"), &[hd])?,
        norm_k: w.load(b, &p("norm_k.weight"), &[hd])?,
        to_out: block_linear(w, b, mode, rt, &[&p("to_out.weight")], &[d, d + m])?,
    })
}

struct DoubleBlock {
    img_qkv: Proj,
    txt_qkv: Proj,
    norm_q: Tensor,
    norm_k: Tensor,
    norm_added_q: Tensor,
    norm_added_k: Tensor,
    to_out: Proj,
    to_add_out: Proj,
    ff_in: Proj,
    ff_out: Proj,
    ff_ctx_in: Proj,
    ff_ctx_out: Proj,
}

struct SingleBlock {
    qkv_mlp: Proj,
    norm_q: Tensor,
    norm_k: Tensor,
    to_out: Proj,
}

/// A linear and, on the unmerged LoRA path, its adapters' low-rank pair.
struct Proj {
    w: Linear,
    lora: Option<LowRank>,
    /// The diffusers weights it concatenates and each one's [rows, cols], to rebuild `lora`.
    names: Vec<String>,
    shape: [usize; 2],
}

impl Proj {
    fn new(w: Linear, b: &dyn Backend, rt: Option<&AdapterSet>, names: &[&str], shape: &[usize]) -> Result<Proj> {
        let lora = runtime_pair(b, rt, names, shape)?;
        Ok(Proj { w, lora, names: names.iter().map(|n| n.to_string()).collect(), shape: [shape[0], shape[1]] })
    }

    /// Swap the run-time adapters; the weight stays.
    fn relink(&mut self, b: &dyn Backend, rt: Option<&AdapterSet>) -> Result<()> {
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        self.lora = runtime_pair(b, rt, &names, &self.shape)?;
        Ok(())
    }

    fn forward(&self, be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let y = self.w.forward(be, x, None)?;
        match &self.lora {
            Some(l) => l.apply(be, x, &y),
            None => Ok(y),
        }
    }

    /// `forward_gated` of `[prefix | swiglu(x)]` (just `swiglu(x)` without a prefix): for an FP8
    /// weight without run-time adapters the activation is quantized where SwiGLU makes it and the
    /// residual added in the GEMM's epilogue (`swiglu_linear_fp8_gated_add`), else it is made in
    /// bf16 first.
    fn forward_swiglu_gated(
        &self,
        be: &dyn Backend,
        prefix: Option<&Tensor>,
        x: &Tensor,
        residual: &Tensor,
        gate: &Tensor,
    ) -> Result<Tensor> {
        if let (Linear::Fp8(w), None) = (&self.w, &self.lora) {
            return be.swiglu_linear_fp8_gated_add(residual, gate, prefix, x, w);
        }
        self.forward_gated(be, &swiglu_beside(be, prefix, x)?, residual, gate)
    }

    /// `forward(layer_norm_modulate(x, shift, scale))`: one op for an FP8 weight without run-time
    /// adapters (the activation quantized in the norm's kernel), else the two steps.
    fn forward_normed(&self, be: &dyn Backend, x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
        match (&self.w, &self.lora) {
            (Linear::Fp8(w), None) => be.layer_norm_modulate_linear_fp8(x, shift, scale, eps, w, None),
            _ => self.forward(be, &be.layer_norm_modulate(x, shift, scale, eps)?),
        }
    }

    /// The FP8 weight when this linear is one without run-time adapters: its activation may then
    /// come quantized from the op that makes it.
    fn fp8_plain(&self) -> Option<&crate::backend::QuantTensor> {
        match (&self.w, &self.lora) {
            (Linear::Fp8(w), None) => Some(w),
            _ => None,
        }
    }

    /// The gated residual `residual + gate · forward(x)`: one fused op for a dense or FP8 weight
    /// without run-time adapters, else the two steps.
    fn forward_gated(&self, be: &dyn Backend, x: &Tensor, residual: &Tensor, gate: &Tensor) -> Result<Tensor> {
        match (&self.w, &self.lora) {
            (Linear::Dense(w), None) => be.linear_gated_add(residual, gate, x, w, None),
            (Linear::Fp8(w), None) => be.linear_fp8_gated_add(residual, gate, x, w, None),
            _ => be.gated_add(residual, gate, &self.forward(be, x)?),
        }
    }
}

/// The run-time adapters of the row-wise concatenation `names` (each `shape`).
fn runtime_pair(b: &dyn Backend, rt: Option<&AdapterSet>, names: &[&str], shape: &[usize]) -> Result<Option<LowRank>> {
    match rt {
        Some(set) => LowRank::build(b, set, names, shape[0], shape[1]),
        None => Ok(None),
    }
}

/// A dense non-block weight (embedders, modulation, output head) with its run-time adapters.
fn dense(
    w: &TransformerWeights,
    b: &dyn Backend,
    rt: Option<&AdapterSet>,
    name: &str,
    shape: &[usize],
) -> Result<Proj> {
    Proj::new(Linear::Dense(w.load(b, name, shape)?), b, rt, &[name], shape)
}

/// How the transformer computes: block linears in bf16 or FP8 (W8A8), attention exact or
/// Sage-style 8-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Compute {
    pub precision: Option<TransformerPrecision>,
    pub attention: AttentionMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
pub enum AttentionMode {
    /// Softmax attention in f32 over bf16 inputs (flash kernel on the GPU).
    #[default]
    Exact,
    /// INT8 Q·Kᵀ with per-block scales and K smoothing, FP8 P·V (SageAttention-style).
    Sage,
}

/// How block linears are made: dense as stored, or FP8 W8A8 quantized on the host at load.
#[derive(Clone, Copy)]
enum BlockLinears<'a> {
    Dense,
    Fp8,
    /// FP8 for streamed blocks: each weight is quantized on first use and its host codes kept, so
    /// later steps only upload them.
    Fp8Kept(&'a HostFp8),
}

/// Host FP8 codes of streamed block linears, by their concatenated names.
type HostFp8 = std::sync::Mutex<std::collections::HashMap<String, Arc<Quantized>>>;

fn block_linear(
    w: &TransformerWeights,
    b: &dyn Backend,
    mode: BlockLinears,
    rt: Option<&AdapterSet>,
    names: &[&str],
    shape: &[usize],
) -> Result<Proj> {
    Proj::new(block_weight(w, b, mode, names, shape)?, b, rt, names, shape)
}

fn block_weight(
    w: &TransformerWeights,
    b: &dyn Backend,
    mode: BlockLinears,
    names: &[&str],
    shape: &[usize],
) -> Result<Linear> {
    // FP8 checkpoints keep their codes (unless a LoRA is merged into them); anything else is
    // quantized from its f32 values.
    let quantize_fp8 = || w.fp8_concat(names, shape);
    match mode {
        // GGUF blocks stay quantized on the device: the weight-only GEMM decodes them.
        BlockLinears::Dense => {
            if let Some(q) = w.stored_blocks(names, shape)? {
                return Ok(Linear::Quant(b.load_quantized(&q)?));
            }
            // Scaled FP8 layers as weight-only FP8 where the backend keeps such codes (the values
            // the weight-only GEMM computes with are those a decode at load would give).
            if b.keeps_fp8_codes() {
                if let Some(q) = w.stored_scaled_fp8(names, shape)? {
                    return Ok(Linear::Quant(b.load_quantized(&q)?));
                }
            }
            Ok(Linear::Dense(w.load_concat(b, names, shape)?))
        }
        BlockLinears::Fp8 => Ok(Linear::Fp8(b.load_quantized(&quantize_fp8()?)?)),
        BlockLinears::Fp8Kept(kept) => {
            let key = names.join("+");
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            let q = match kept.get(&key) {
                Some(q) => q.clone(),
                None => {
                    let q = Arc::new(quantize_fp8()?);
                    kept.insert(key, q.clone());
                    q
                }
            };
            Ok(Linear::Fp8(b.load_quantized(&q)?))
        }
    }
}

pub struct Flux2Transformer {
    be: Arc<dyn Backend>,
    cfg: TransformerConfig,
    time_1: Proj,
    time_2: Proj,
    guidance: Option<(Proj, Proj)>,
    mod_img: Proj,
    mod_txt: Proj,
    mod_single: Proj,
    x_embedder: Proj,
    context_embedder: Proj,
    /// None: streamed from `weights` at each forward.
    double: Vec<Option<DoubleBlock>>,
    single: Vec<Option<SingleBlock>>,
    /// The checkpoint, kept mapped for streamed blocks.
    weights: TransformerWeights,
    /// FP8 codes of the streamed blocks, kept on the host after their first use.
    streamed_fp8: HostFp8,
    norm_out: Proj,
    proj_out: Proj,
    compute: Compute,
    /// Adapters applied unmerged (`LoraMode::Runtime`), also to streamed blocks.
    runtime: Option<Arc<AdapterSet>>,
    /// Device RoPE tables of the last ids seen.
    rope_cache: std::sync::Mutex<Option<(PositionIds, Tensor, Tensor)>>,
}

/// The reference tokens' keys and values at every block (after the QK norm and RoPE), as the KV
/// variant computes them once at the first step (diffusers' `Flux2KVCache`): `[B, Lr, H, hd]`.
pub struct RefKvCache {
    /// Reference tokens per sample.
    pub tokens: usize,
    double: Vec<(Tensor, Tensor)>,
    single: Vec<(Tensor, Tensor)>,
}

impl RefKvCache {
    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.double
            .iter()
            .chain(&self.single)
            .map(|(k, v)| k.numel() * k.dtype().size_in_bytes() + v.numel() * v.dtype().size_in_bytes())
            .sum()
    }
}

/// How a forward treats reference tokens under the KV scheme.
enum KvStep<'a> {
    /// The first step: the reference tokens run through every block (modulated with the time
    /// `ref_time`, attending only to themselves) and their K/V are kept.
    Extract { refs: &'a Tensor, ref_ids: &'a PositionIds, ref_time: f32 },
    /// Later steps: only text and image tokens run; the kept K/V join every attention.
    Cached(&'a RefKvCache),
    /// No reference stream: the plain forward.
    Plain,
}

/// The per-sample modulation vectors of one stream: shift, scale, gate per set.
struct Modulation {
    sets: Vec<[Tensor; 3]>,
}

impl Modulation {
    /// Split `[B, 3·sets·D]` into sets of (shift, scale, gate) `[B, D]` views.
    fn split(m: &Tensor, sets: usize) -> Result<Modulation> {
        let chunks = m.chunk(3 * sets, 1)?;
        Ok(Modulation { sets: chunks.chunks(3).map(|c| [c[0].clone(), c[1].clone(), c[2].clone()]).collect() })
    }
}

impl Flux2Transformer {
    /// Load from a pipeline folder, a `transformer/` folder or a BFL single file.
    pub fn load(be: Arc<dyn Backend>, path: &Path) -> Result<Flux2Transformer> {
        Flux2Transformer::load_with(be, path, None, Compute::default())
    }

    /// As [`Flux2Transformer::load`], keeping only `resident_blocks` blocks on the device.
    pub fn load_streaming(
        be: Arc<dyn Backend>,
        path: &Path,
        resident_blocks: Option<usize>,
    ) -> Result<Flux2Transformer> {
        Flux2Transformer::load_with(be, path, resident_blocks, Compute::default())
    }

    /// With block residency and the compute mode (FP8 block linears, Sage attention). A single
    /// file without config.json (BFL layout, or diffusers names as in the official FP8 releases)
    /// gets its config from the tensor shapes.
    pub fn load_with(
        be: Arc<dyn Backend>,
        path: &Path,
        resident_blocks: Option<usize>,
        compute: Compute,
    ) -> Result<Flux2Transformer> {
        Flux2Transformer::load_with_loras(be, path, resident_blocks, compute, &LoraOptions::default())
    }

    /// As [`Flux2Transformer::load_with`], with LoRAs merged at load or applied at run time.
    pub fn load_with_loras(
        be: Arc<dyn Backend>,
        path: &Path,
        resident_blocks: Option<usize>,
        compute: Compute,
        loras: &LoraOptions,
    ) -> Result<Flux2Transformer> {
        let (store, layout, cfg) = open(path)?;
        let set = if loras.loras.is_empty() { None } else { Some(Arc::new(AdapterSet::load(&loras.loras, &cfg)?)) };
        Flux2Transformer::from_store_adapted(be, store, layout, cfg, resident_blocks, compute, set, loras.mode)
    }

    pub fn from_store(
        be: Arc<dyn Backend>,
        store: WeightStore,
        layout: Layout,
        cfg: TransformerConfig,
    ) -> Result<Flux2Transformer> {
        Flux2Transformer::from_store_streaming(be, store, layout, cfg, None, Compute::default())
    }

    /// With `resident_blocks = Some(k)`, only the first k blocks (double, then single) live on the
    /// device; every other block is uploaded from the memory-mapped file when its turn comes and
    /// freed after it, so the device holds at most one streamed block at a time.
    pub fn from_store_streaming(
        be: Arc<dyn Backend>,
        store: WeightStore,
        layout: Layout,
        cfg: TransformerConfig,
        resident_blocks: Option<usize>,
        compute: Compute,
    ) -> Result<Flux2Transformer> {
        Flux2Transformer::from_store_adapted(be, store, layout, cfg, resident_blocks, compute, None, LoraMode::Merge)
    }

    /// With adapters (resolved against `cfg`): merged into the weights, or kept as low-rank
    /// pairs beside them.
    #[allow(clippy::too_many_arguments)]
    pub fn from_store_adapted(
        be: Arc<dyn Backend>,
        store: WeightStore,
        layout: Layout,
        cfg: TransformerConfig,
        resident_blocks: Option<usize>,
        compute: Compute,
        adapters: Option<Arc<AdapterSet>>,
        mode: LoraMode,
    ) -> Result<Flux2Transformer> {
        cfg.validate().map_err(|r| Error::config(store.origin(), r))?;
        let (merged, runtime) = match mode {
            LoraMode::Merge => (adapters.clone(), None),
            LoraMode::Runtime => (None, adapters.clone()),
        };
        let w = TransformerWeights::new(Arc::new(store), layout, &cfg).with_adapters(merged.clone());
        let rt = runtime.as_deref();
        let b: &dyn Backend = &*be;
        let d = cfg.hidden();
        let tc = cfg.timestep_guidance_channels;
        let guidance = if cfg.guidance_embeds {
            Some((
                dense(&w, b, rt, "time_guidance_embed.guidance_embedder.linear_1.weight", &[d, tc])?,
                dense(&w, b, rt, "time_guidance_embed.guidance_embedder.linear_2.weight", &[d, d])?,
            ))
        } else {
            None
        };
        let resident = resident_blocks.unwrap_or(usize::MAX);
        let mode =
            if compute.precision == Some(TransformerPrecision::Fp8) { BlockLinears::Fp8 } else { BlockLinears::Dense };
        let double = (0..cfg.num_layers)
            .map(|i| if i < resident { load_double(&w, b, &cfg, mode, rt, i).map(Some) } else { Ok(None) })
            .collect::<Result<Vec<_>>>()?;
        let single =
            (0..cfg.num_single_layers)
                .map(|i| {
                    if cfg.num_layers + i < resident {
                        load_single(&w, b, &cfg, mode, rt, i).map(Some)
                    } else {
                        Ok(None)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
        let mut t = Flux2Transformer {
            time_1: dense(&w, b, rt, "time_guidance_embed.timestep_embedder.linear_1.weight", &[d, tc])?,
            time_2: dense(&w, b, rt, "time_guidance_embed.timestep_embedder.linear_2.weight", &[d, d])?,
            guidance,
            mod_img: dense(&w, b, rt, "double_stream_modulation_img.linear.weight", &[6 * d, d])?,
            mod_txt: dense(&w, b, rt, "double_stream_modulation_txt.linear.weight", &[6 * d, d])?,
            mod_single: dense(&w, b, rt, "single_stream_modulation.linear.weight", &[3 * d, d])?,
            x_embedder: dense(&w, b, rt, "x_embedder.weight", &[d, cfg.in_channels])?,
            context_embedder: dense(&w, b, rt, "context_embedder.weight", &[d, cfg.joint_attention_dim])?,
            double,
            single,
            norm_out: dense(&w, b, rt, "norm_out.linear.weight", &[2 * d, d])?,
            proj_out: dense(&w, b, rt, "proj_out.weight", &[cfg.out_features(), d])?,
            rope_cache: Default::default(),
            runtime,
            compute,
            cfg,
            be,
            weights: w,
            streamed_fp8: Default::default(),
        };
        if let Some(m) = &merged {
            m.log_merge();
        }
        if t.runtime.is_some() {
            tracing::info!(
                "LoRA run-time adapters: {:.1} MiB on the device",
                t.runtime_lora_bytes() as f64 / 1048576.0
            );
        }
        Ok(t)
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Every resident linear (the streamed blocks are built per forward).
    fn projs_mut(&mut self) -> Vec<&mut Proj> {
        let mut all = vec![
            &mut self.time_1,
            &mut self.time_2,
            &mut self.mod_img,
            &mut self.mod_txt,
            &mut self.mod_single,
            &mut self.x_embedder,
            &mut self.context_embedder,
            &mut self.norm_out,
            &mut self.proj_out,
        ];
        if let Some((g1, g2)) = self.guidance.as_mut() {
            all.extend([g1, g2]);
        }
        for blk in self.double.iter_mut().flatten() {
            all.extend([
                &mut blk.img_qkv,
                &mut blk.txt_qkv,
                &mut blk.to_out,
                &mut blk.to_add_out,
                &mut blk.ff_in,
                &mut blk.ff_out,
                &mut blk.ff_ctx_in,
                &mut blk.ff_ctx_out,
            ]);
        }
        for blk in self.single.iter_mut().flatten() {
            all.extend([&mut blk.qkv_mlp, &mut blk.to_out]);
        }
        all
    }

    /// Device bytes of the run-time adapters of the resident linears (0 when merged or none).
    pub fn runtime_lora_bytes(&mut self) -> usize {
        self.projs_mut().iter().filter_map(|p| p.lora.as_ref()).map(|l| l.bytes()).sum()
    }

    /// What merging LoRAs at load cost in precision (None: nothing merged).
    pub fn lora_merge_stats(&self) -> Option<crate::lora::merge::MergeStats> {
        self.weights.adapters().map(|a| a.merge_stats())
    }

    /// Replace the unmerged adapters (a transformer loaded with `LoraMode::Runtime`, or without
    /// LoRAs): every linear's low-rank pair is rebuilt, the base weights are not touched, so
    /// switching costs no reload. An empty list removes them. A file that fails to load changes
    /// nothing.
    pub fn set_runtime_loras(&mut self, loras: &[crate::lora::LoraSpec]) -> Result<()> {
        if self.weights.has_adapters() {
            return Err(Error::Unsupported(
                "these LoRAs were merged into the weights at load; load with --lora-mode runtime to switch them".into(),
            ));
        }
        let set = if loras.is_empty() { None } else { Some(Arc::new(AdapterSet::load(loras, &self.cfg)?)) };
        let be = self.be.clone();
        for p in self.projs_mut() {
            p.relink(&*be, set.as_deref())?;
        }
        self.runtime = set;
        Ok(())
    }

    pub fn layout(&self) -> Layout {
        self.weights.layout
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.be
    }

    /// `hidden_states [B, L, Cin]`, `context [B, Lt, C]` (both on this model's backend), the
    /// timestep the sinusoid sees per sample (`1000·σ`, rounded as the caller's reference does:
    /// see [`scale_in_dtype`] and `sampler::Schedule::model_time`), ids for the L image and Lt
    /// text tokens, and the guidance (also ×1000) for models with a guidance embedder;
    /// returns `[B, L, p²·Cout]`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        context: &Tensor,
        timestep: &[f32],
        img_ids: &PositionIds,
        txt_ids: &PositionIds,
        guidance: Option<&[f32]>,
    ) -> Result<Tensor> {
        let times = self.device_times(timestep)?;
        let guidance = guidance.map(|g| self.device_times(g)).transpose()?;
        Ok(self.forward_kv(hidden_states, context, &times, img_ids, txt_ids, guidance.as_ref(), KvStep::Plain)?.0)
    }

    fn check_cache(&self, cache: &RefKvCache) -> Result<()> {
        if cache.double.len() != self.double.len() || cache.single.len() != self.single.len() {
            return Err(Error::shape("transformer", "the KV cache was made by another model"));
        }
        Ok(())
    }

    /// Timesteps (or guidance values) as the f32 vector the time embedding reads on the device.
    fn device_times(&self, values: &[f32]) -> Result<Tensor> {
        self.be.upload(&Tensor::from_f32(values.to_vec(), &[values.len()])?, DType::F32)
    }

    /// The KV variant's first step (diffusers' `kv_cache_mode="extract"`): `refs [B, Lr, Cin]`
    /// (ids `ref_ids`) run with the image tokens; their modulation uses the time `ref_time` (×1000
    /// like `timestep`; the pipeline passes 0), text and image tokens attend to everything and the
    /// reference tokens only to themselves. Returns the image tokens' output and the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_kv_extract(
        &self,
        hidden_states: &Tensor,
        refs: &Tensor,
        context: &Tensor,
        timestep: &[f32],
        img_ids: &PositionIds,
        ref_ids: &PositionIds,
        txt_ids: &PositionIds,
        ref_time: f32,
    ) -> Result<(Tensor, RefKvCache)> {
        if refs.rank() != 3 || refs.dim(0) != hidden_states.dim(0) || ref_ids.len() != refs.dim(1) {
            return Err(Error::shape(
                "transformer",
                format!(
                    "reference tokens {:?} with {} ids for a batch of {}",
                    refs.shape(),
                    ref_ids.len(),
                    hidden_states.dim(0)
                ),
            ));
        }
        let (out, cache) = self.forward_kv(
            hidden_states,
            context,
            &self.device_times(timestep)?,
            img_ids,
            txt_ids,
            None,
            KvStep::Extract { refs, ref_ids, ref_time },
        )?;
        Ok((out, cache.expect("extract returns a cache")))
    }

    /// The KV variant's later steps (`kv_cache_mode="cached"`): image tokens only, the cached
    /// reference K/V inserted between the text and image keys of every attention.
    pub fn forward_kv_cached(
        &self,
        hidden_states: &Tensor,
        context: &Tensor,
        timestep: &[f32],
        img_ids: &PositionIds,
        txt_ids: &PositionIds,
        cache: &RefKvCache,
    ) -> Result<Tensor> {
        self.check_cache(cache)?;
        let times = self.device_times(timestep)?;
        Ok(self.forward_kv(hidden_states, context, &times, img_ids, txt_ids, None, KvStep::Cached(cache))?.0)
    }

    /// The forward of every scheme: plain, or the KV variant's extract and cached steps. The
    /// timesteps and guidance are f32 `[B]` on the device (see `device_times`).
    #[allow(clippy::too_many_arguments)]
    fn forward_kv(
        &self,
        hidden_states: &Tensor,
        context: &Tensor,
        timestep: &Tensor,
        img_ids: &PositionIds,
        txt_ids: &PositionIds,
        guidance: Option<&Tensor>,
        step: KvStep,
    ) -> Result<(Tensor, Option<RefKvCache>)> {
        let be = &*self.be;
        let cfg = &self.cfg;
        let d = cfg.hidden();
        let _scope = scope::enter(|| "transformer".into());
        let counts = (timestep.numel(), guidance.map(Tensor::numel));
        self.check_inputs(hidden_states, context, counts, img_ids, txt_ids)?;
        let (lt, li) = (context.dim(1), hidden_states.dim(1));

        let temb = self.time_embedding(timestep, guidance)?;
        let silu_temb = be.silu(&temb)?;
        let mod_img = Modulation::split(&self.mod_img.forward(be, &silu_temb)?, 2)?;
        let mod_txt = Modulation::split(&self.mod_txt.forward(be, &silu_temb)?, 2)?;
        let mod_single = Modulation::split(&self.mod_single.forward(be, &silu_temb)?, 1)?;

        let mut img = self.x_embedder.forward(be, hidden_states)?;
        let mut txt = self.context_embedder.forward(be, context)?;
        let (cos, sin) = self.rope_tables(txt_ids, img_ids)?;
        let rope = Rope { cos: &cos, sin: &sin };

        // The reference stream (extract only): its own modulation and RoPE tables.
        let mut refs = None;
        if let KvStep::Extract { refs: r, ref_ids, ref_time } = &step {
            let ref_times = self.device_times(&vec![*ref_time; r.dim(0)])?;
            let ref_temb = be.silu(&self.time_embedding(&ref_times, None)?)?;
            let ref_mod_img = Modulation::split(&self.mod_img.forward(be, &ref_temb)?, 2)?;
            let ref_mod_single = Modulation::split(&self.mod_single.forward(be, &ref_temb)?, 1)?;
            let (cos, sin) = flux_tables(ref_ids, &cfg.axes_dims_rope, cfg.rope_theta)?;
            let shape = [ref_ids.len(), cfg.attention_head_dim / 2];
            let cos = be.upload(&Tensor::from_f32(cos, &shape)?, DType::F32)?;
            let sin = be.upload(&Tensor::from_f32(sin, &shape)?, DType::F32)?;
            refs = Some((self.x_embedder.forward(be, r)?, ref_mod_img, ref_mod_single, cos, sin));
        }
        let mut kept_double = Vec::new();
        let mut kept_single = Vec::new();

        let streamed = if self.fp8() { BlockLinears::Fp8Kept(&self.streamed_fp8) } else { BlockLinears::Dense };
        for (i, block) in self.double.iter().enumerate() {
            let owned;
            let block = match block {
                Some(b) => b,
                None => {
                    owned = load_double(&self.weights, be, cfg, streamed, self.runtime.as_deref(), i)?;
                    &owned
                }
            };
            let _block = scope::enter(|| format!("double_blocks.{i}"));
            let reference = match (&step, &refs) {
                (KvStep::Extract { .. }, Some((r, rm, _, cos, sin))) => {
                    RefStream::Tokens { x: r, mods: rm, rope: Rope { cos, sin } }
                }
                (KvStep::Cached(cache), _) => RefStream::Cached(&cache.double[i]),
                (KvStep::Plain, _) => RefStream::None,
                _ => unreachable!("extract always has reference tokens"),
            };
            let (new_img, new_txt, new_ref, kv) =
                self.double_block_kv(block, &img, &txt, &mod_img, &mod_txt, &rope, reference)?;
            (img, txt) = (new_img, new_txt);
            if let (Some(r), Some(slot)) = (new_ref, refs.as_mut()) {
                slot.0 = r;
            }
            kept_double.extend(kv);
        }
        let mut h = be.concat(&[&txt, &img], 1)?;
        for (i, block) in self.single.iter().enumerate() {
            let owned;
            let block = match block {
                Some(b) => b,
                None => {
                    owned = load_single(&self.weights, be, cfg, streamed, self.runtime.as_deref(), i)?;
                    &owned
                }
            };
            let _block = scope::enter(|| format!("single_blocks.{i}"));
            let reference = match (&step, &refs) {
                (KvStep::Extract { .. }, Some((r, _, rm, cos, sin))) => {
                    RefStream::Tokens { x: r, mods: rm, rope: Rope { cos, sin } }
                }
                (KvStep::Cached(cache), _) => RefStream::Cached(&cache.single[i]),
                (KvStep::Plain, _) => RefStream::None,
                _ => unreachable!("extract always has reference tokens"),
            };
            let (new_h, new_ref, kv) = self.single_block_kv(block, &h, lt, &mod_single, &rope, reference)?;
            h = new_h;
            if let (Some(r), Some(slot)) = (new_ref, refs.as_mut()) {
                slot.0 = r;
            }
            kept_single.extend(kv);
        }
        let img = h.narrow(1, lt, li)?;
        let _out = scope::enter(|| "norm_out/proj_out".into());
        let emb = self.norm_out.forward(be, &silu_temb)?;
        let (scale, shift) = (emb.narrow(1, 0, d)?, emb.narrow(1, d, d)?);
        let out = be.layer_norm_modulate(&img, &shift, &scale, cfg.eps as f32)?;
        let out = self.proj_out.forward(be, &out)?;
        let cache = match step {
            KvStep::Extract { refs: r, .. } => {
                Some(RefKvCache { tokens: r.dim(1), double: kept_double, single: kept_single })
            }
            KvStep::Cached(_) | KvStep::Plain => None,
        };
        Ok((out, cache))
    }

    /// Keys `[txt | ref | img]` of the KV scheme from the main `[txt | img]` keys.
    fn with_ref(&self, main: &Tensor, reference: &Tensor, lt: usize) -> Result<Tensor> {
        let n = main.dim(1);
        self.be.concat(&[&main.narrow(1, 0, lt)?, reference, &main.narrow(1, lt, n - lt)?], 1)
    }

    /// A double block under the KV scheme: text and image streams (the plain block when there is no reference stream), the
    /// reference tokens (extract) through the image weights with their own modulation, or the
    /// cached reference K/V (cached). Returns (img, txt, ref, the reference K/V when extracted).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn double_block_kv(
        &self,
        blk: &DoubleBlock,
        img: &Tensor,
        txt: &Tensor,
        mi: &Modulation,
        mt: &Modulation,
        rope: &Rope,
        reference: RefStream,
    ) -> Result<(Tensor, Tensor, Option<Tensor>, Option<(Tensor, Tensor)>)> {
        let be = &*self.be;
        let eps = self.cfg.eps as f32;
        let (b, lt, d) = (img.dim(0), txt.dim(1), self.cfg.hidden());
        let [sh1, sc1, _] = &mi.sets[0];
        let [csh1, csc1, _] = &mt.sets[0];

        let [qi, ki, vi] = self.split_qkv(&blk.img_qkv.forward_normed(be, img, sh1, sc1, eps)?)?;
        let [qt, kt, vt] = self.split_qkv(&blk.txt_qkv.forward_normed(be, txt, csh1, csc1, eps)?)?;
        let v = be.concat(&[&vt, &vi], 1)?;
        if self.sage_normed(&reference) {
            let q = [QkPart { x: &qt, weight: &blk.norm_added_q }, QkPart { x: &qi, weight: &blk.norm_q }];
            let k = [QkPart { x: &kt, weight: &blk.norm_added_k }, QkPart { x: &ki, weight: &blk.norm_k }];
            // FP8 output projections: the attention kernel writes their e4m3 activations.
            if let Some(outs) = Self::fp8_outs(blk, img, txt, mi, mt) {
                let qk = self.qk_rope(rope);
                let [txt, img] =
                    be.attention_sage_normed_linear_fp8_gated_add(&q, &k, &qk, &v, self.attn_scale(), outs)?;
                let (img, txt) = self.double_block_ff(blk, &img, &txt, mi, mt)?;
                return Ok((img, txt, None, None));
            }
            let o = self.attend_sage_normed(&q, &k, rope, &v)?;
            return self.double_block_out(blk, img, txt, mi, mt, o, None, None);
        }
        // The tables cover [txt | img]: text rows first, image rows from `lt`.
        let qt = rope.norm_apply(be, &qt, &blk.norm_added_q, eps, 0)?;
        let qi = rope.norm_apply(be, &qi, &blk.norm_q, eps, lt)?;
        let kt = rope.norm_apply(be, &kt, &blk.norm_added_k, eps, 0)?;
        let ki = rope.norm_apply(be, &ki, &blk.norm_k, eps, lt)?;
        let q = be.concat(&[&qt, &qi], 1)?;
        let k = be.concat(&[&kt, &ki], 1)?;
        if let (RefStream::None, Some(outs)) = (&reference, Self::fp8_outs(blk, img, txt, mi, mt)) {
            // Exact attention (Sage took the branch above) into FP8 output projections: flash
            // attention's kernel writes their e4m3 activations.
            let [txt, img] = be.attention_linear_fp8_gated_add(&q, &k, &v, self.attn_scale(), outs)?;
            let (img, txt) = self.double_block_ff(blk, &img, &txt, mi, mt)?;
            return Ok((img, txt, None, None));
        }

        let (o, ref_out, kept) = match reference {
            RefStream::Tokens { x: r, mods, rope: ref_rope } => {
                let lr = r.dim(1);
                let [rsh1, rsc1, rg1] = &mods.sets[0];
                let [rsh2, rsc2, rg2] = &mods.sets[1];
                let [qr, kr, vr] = self.split_qkv(&blk.img_qkv.forward_normed(be, r, rsh1, rsc1, eps)?)?;
                let qr = ref_rope.norm_apply(be, &qr, &blk.norm_q, eps, 0)?;
                let kr = ref_rope.norm_apply(be, &kr, &blk.norm_k, eps, 0)?;
                let vr = be.contiguous(&vr)?;
                let o = self.attend(&q, &self.with_ref(&k, &kr, lt)?, &self.with_ref(&v, &vr, lt)?)?;
                let o_ref = self.attend(&qr, &kr, &vr)?.reshape(&[b, lr, d])?;
                let r = blk.to_out.forward_gated(be, &o_ref, r, rg1)?;
                let r = self.feed_forward_gated(&r, [rsh2, rsc2], &blk.ff_in, &blk.ff_out, rg2)?;
                (o, Some(r), Some((kr, vr)))
            }
            RefStream::Cached((kr, vr)) => {
                (self.attend(&q, &self.with_ref(&k, kr, lt)?, &self.with_ref(&v, vr, lt)?)?, None, None)
            }
            RefStream::None => (self.attend(&q, &k, &v)?, None, None),
        };
        self.double_block_out(blk, img, txt, mi, mt, o, ref_out, kept)
    }

    /// The rest of a double block from its attention output `o` `[B, Lt + Li, H, hd]`: output
    /// projections with the gated residuals, then the gated feed-forwards of both streams.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn double_block_out(
        &self,
        blk: &DoubleBlock,
        img: &Tensor,
        txt: &Tensor,
        mi: &Modulation,
        mt: &Modulation,
        o: Tensor,
        ref_out: Option<Tensor>,
        kept: Option<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor, Option<Tensor>, Option<(Tensor, Tensor)>)> {
        let be = &*self.be;
        let (b, lt, li, d) = (img.dim(0), txt.dim(1), img.dim(1), self.cfg.hidden());
        let [_, _, g1] = &mi.sets[0];
        let [_, _, cg1] = &mt.sets[0];
        let o = o.reshape(&[b, lt + li, d])?;
        let (o_txt, o_img) = (o.narrow(1, 0, lt)?, o.narrow(1, lt, li)?);
        let img = blk.to_out.forward_gated(be, &o_img, img, g1)?;
        let txt = blk.to_add_out.forward_gated(be, &o_txt, txt, cg1)?;
        let (img, txt) = self.double_block_ff(blk, &img, &txt, mi, mt)?;
        Ok((img, txt, ref_out, kept))
    }

    /// The double block's output projections with their gated residuals (text, then image) when
    /// both are FP8 without run-time adapters: their activations may come quantized from the
    /// attention.
    fn fp8_outs<'a>(
        blk: &'a DoubleBlock,
        img: &'a Tensor,
        txt: &'a Tensor,
        mi: &'a Modulation,
        mt: &'a Modulation,
    ) -> Option<[GatedFp8<'a>; 2]> {
        let (w_txt, w_img) = (blk.to_add_out.fp8_plain()?, blk.to_out.fp8_plain()?);
        let [_, _, g1] = &mi.sets[0];
        let [_, _, cg1] = &mt.sets[0];
        Some([GatedFp8 { x: txt, gate: cg1, w: w_txt }, GatedFp8 { x: img, gate: g1, w: w_img }])
    }

    /// The gated feed-forwards that end a double block, of both streams after their attention.
    fn double_block_ff(
        &self,
        blk: &DoubleBlock,
        img: &Tensor,
        txt: &Tensor,
        mi: &Modulation,
        mt: &Modulation,
    ) -> Result<(Tensor, Tensor)> {
        let [sh2, sc2, g2] = &mi.sets[1];
        let [csh2, csc2, cg2] = &mt.sets[1];
        let img = self.feed_forward_gated(img, [sh2, sc2], &blk.ff_in, &blk.ff_out, g2)?;
        let txt = self.feed_forward_gated(txt, [csh2, csc2], &blk.ff_ctx_in, &blk.ff_ctx_out, cg2)?;
        Ok((img, txt))
    }

    /// A single block under the KV scheme (see `double_block_kv`); `h` is `[txt | img]`.
    #[allow(clippy::type_complexity)]
    fn single_block_kv(
        &self,
        blk: &SingleBlock,
        h: &Tensor,
        lt: usize,
        ms: &Modulation,
        rope: &Rope,
        reference: RefStream,
    ) -> Result<(Tensor, Option<Tensor>, Option<(Tensor, Tensor)>)> {
        let be = &*self.be;
        let eps = self.cfg.eps as f32;
        let (b, n, d, m) = (h.dim(0), h.dim(1), self.cfg.hidden(), self.cfg.mlp_hidden());
        let [shift, scale, gate] = &ms.sets[0];
        let y = blk.qkv_mlp.forward_normed(be, h, shift, scale, eps)?;
        let [q, k, v] = self.split_qkv(&y)?;
        let mlp = y.narrow(2, 3 * d, 2 * m)?;
        if self.sage_normed(&reference) {
            let (q, k) = ([QkPart { x: &q, weight: &blk.norm_q }], [QkPart { x: &k, weight: &blk.norm_k }]);
            let o = self.attend_sage_normed(&q, &k, rope, &v)?.reshape(&[b, n, d])?;
            return Ok((blk.to_out.forward_swiglu_gated(be, Some(&o), &mlp, h, gate)?, None, None));
        }
        let q = rope.norm_apply(be, &q, &blk.norm_q, eps, 0)?;
        let k = rope.norm_apply(be, &k, &blk.norm_k, eps, 0)?;
        let (o, ref_out, kept) = match reference {
            RefStream::Tokens { x: r, mods, rope: ref_rope } => {
                let lr = r.dim(1);
                let [rshift, rscale, rgate] = &mods.sets[0];
                let y_ref = blk.qkv_mlp.forward_normed(be, r, rshift, rscale, eps)?;
                let [qr, kr, vr] = self.split_qkv(&y_ref)?;
                let qr = ref_rope.norm_apply(be, &qr, &blk.norm_q, eps, 0)?;
                let kr = ref_rope.norm_apply(be, &kr, &blk.norm_k, eps, 0)?;
                let vr = be.contiguous(&vr)?;
                let o = self.attend(&q, &self.with_ref(&k, &kr, lt)?, &self.with_ref(&v, &vr, lt)?)?;
                let o_ref = self.attend(&qr, &kr, &vr)?.reshape(&[b, lr, d])?;
                let r = blk.to_out.forward_swiglu_gated(be, Some(&o_ref), &y_ref.narrow(2, 3 * d, 2 * m)?, r, rgate)?;
                (o, Some(r), Some((kr, vr)))
            }
            RefStream::Cached((kr, vr)) => {
                (self.attend(&q, &self.with_ref(&k, kr, lt)?, &self.with_ref(&v, vr, lt)?)?, None, None)
            }
            RefStream::None => (self.attend(&q, &k, &v)?, None, None),
        };
        let o = o.reshape(&[b, n, d])?;
        let h = blk.to_out.forward_swiglu_gated(be, Some(&o), &mlp, h, gate)?;
        Ok((h, ref_out, kept))
    }

    /// RoPE tables for the joint sequence (text first, then image), kept on the device while
    /// the ids stay the same: every denoising step reuses them without an upload.
    fn rope_tables(&self, txt_ids: &PositionIds, img_ids: &PositionIds) -> Result<(Tensor, Tensor)> {
        let ids = PositionIds::concat(&[txt_ids, img_ids])?;
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, cos, sin)) = cache.as_ref() {
            if *cached == ids {
                return Ok((cos.clone(), sin.clone()));
            }
        }
        let (cfg, be) = (&self.cfg, &*self.be);
        let (cos, sin) = flux_tables(&ids, &cfg.axes_dims_rope, cfg.rope_theta)?;
        let shape = [ids.len(), cfg.attention_head_dim / 2];
        // Tables stay f32 on every backend: diffusers applies RoPE in f32.
        let cos = be.upload(&Tensor::from_f32(cos, &shape)?, DType::F32)?;
        let sin = be.upload(&Tensor::from_f32(sin, &shape)?, DType::F32)?;
        *cache = Some((ids, cos.clone(), sin.clone()));
        Ok((cos, sin))
    }

    /// `counts`: how many timesteps and guidance values came with the inputs.
    fn check_inputs(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        (timesteps, guidance): (usize, Option<usize>),
        img_ids: &PositionIds,
        txt_ids: &PositionIds,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let bad = |what: String| Err(Error::shape("transformer", what));
        if x.rank() != 3 || x.dim(2) != cfg.in_channels {
            return bad(format!("hidden_states must be [B, L, {}], got {:?}", cfg.in_channels, x.shape()));
        }
        if ctx.rank() != 3 || ctx.dim(0) != x.dim(0) || ctx.dim(2) != cfg.joint_attention_dim {
            return bad(format!(
                "encoder_hidden_states must be [{}, Lt, {}], got {:?}",
                x.dim(0),
                cfg.joint_attention_dim,
                ctx.shape()
            ));
        }
        if timesteps != x.dim(0) {
            return bad(format!("timestep must have one value per sample ({}), got {timesteps}", x.dim(0)));
        }
        if img_ids.len() != x.dim(1) || txt_ids.len() != ctx.dim(1) {
            return bad(format!(
                "img_ids/txt_ids have {}/{} rows for {} image and {} text tokens",
                img_ids.len(),
                txt_ids.len(),
                x.dim(1),
                ctx.dim(1)
            ));
        }
        if let Some(g) = guidance {
            if g != x.dim(0) {
                return bad(format!("guidance must have one value per sample ({}), got {g}", x.dim(0)));
            }
        }
        Ok(())
    }

    /// The cos-first sinusoid of the timestep and `linear_2(silu(linear_1(.)))`; guidance adds
    /// its own embedding.
    fn time_embedding(&self, timestep: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        let be = &*self.be;
        let embed = |t: &Tensor, l1: &Proj, l2: &Proj| -> Result<Tensor> {
            let proj = be.timestep_embedding(t, self.cfg.timestep_guidance_channels, 10000.0)?;
            l2.forward(be, &be.silu(&l1.forward(be, &proj)?)?)
        };
        let temb = embed(timestep, &self.time_1, &self.time_2)?;
        match (guidance, &self.guidance) {
            (Some(g), Some((g1, g2))) => be.axpby(1.0, &temb, 1.0, &embed(g, g1, g2)?),
            _ => Ok(temb),
        }
    }

    fn fp8(&self) -> bool {
        self.compute.precision == Some(TransformerPrecision::Fp8)
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// Switch the attention path (the block weights do not depend on it).
    pub fn set_attention(&mut self, attention: AttentionMode) {
        self.compute.attention = attention;
    }

    /// `x + gate · FF(layer_norm_modulate(x, shift, scale))`, FF the SwiGLU feed-forward.
    fn feed_forward_gated(
        &self,
        x: &Tensor,
        [shift, scale]: [&Tensor; 2],
        w_in: &Proj,
        w_out: &Proj,
        gate: &Tensor,
    ) -> Result<Tensor> {
        let be = &*self.be;
        let hidden = w_in.forward_normed(be, x, shift, scale, self.cfg.eps as f32)?;
        w_out.forward_swiglu_gated(be, None, &hidden, x, gate)
    }

    /// Views q, k, v `[B, L, H, hd]` of a fused `[B, L, 3D(+…)]` projection.
    fn split_qkv(&self, qkv: &Tensor) -> Result<[Tensor; 3]> {
        let (b, l) = (qkv.dim(0), qkv.dim(1));
        let (d, h, hd) = (self.cfg.hidden(), self.cfg.num_attention_heads, self.cfg.attention_head_dim);
        let part = |i: usize| qkv.narrow(2, i * d, d)?.reshape(&[b, l, h, hd]);
        Ok([part(0)?, part(1)?, part(2)?])
    }

    /// Whether a block's Sage attention takes its q and k before the QK norm (the backend then
    /// quantizes them in the norm's kernel): the Sage path without reference tokens.
    fn sage_normed(&self, reference: &RefStream) -> bool {
        matches!(self.compute.attention, AttentionMode::Sage) && matches!(reference, RefStream::None)
    }

    /// Sage attention of raw q and k parts (each normed with its weight; the tables cover the
    /// joint sequence from row 0) and v.
    fn attend_sage_normed(&self, q: &[QkPart], k: &[QkPart], rope: &Rope, v: &Tensor) -> Result<Tensor> {
        self.be.attention_sage_normed(q, k, &self.qk_rope(rope), v, self.attn_scale())
    }

    /// Attention's softmax scale, 1/√head_dim.
    fn attn_scale(&self) -> f32 {
        1.0 / (self.cfg.attention_head_dim as f32).sqrt()
    }

    /// The QK norm's epsilon and the joint sequence's RoPE tables, as the normed attentions take them.
    fn qk_rope<'a>(&self, rope: &Rope<'a>) -> QkRope<'a> {
        QkRope { eps: self.cfg.eps as f32, cos: rope.cos, sin: rope.sin, pairs: RopePairs::Interleaved }
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let scale = self.attn_scale();
        match self.compute.attention {
            AttentionMode::Exact => self.be.attention(q, k, v, &AttnMask::None, scale),
            AttentionMode::Sage => self.be.attention_sage(q, k, v, &AttnMask::None, scale),
        }
    }
}

/// The reference tokens of a KV-scheme block: running (extract) or cached K/V.
enum RefStream<'a> {
    /// No reference tokens in this scheme (plain blocks).
    None,
    Tokens {
        x: &'a Tensor,
        mods: &'a Modulation,
        rope: Rope<'a>,
    },
    Cached(&'a (Tensor, Tensor)),
}

struct Rope<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
}

impl Rope<'_> {
    /// RMSNorm of q or k `[B, L, H, D]` with `weight`, then RoPE with the table rows of its L
    /// tokens, which start at row `start` of the joint sequence's tables.
    fn norm_apply(&self, be: &dyn Backend, x: &Tensor, weight: &Tensor, eps: f32, start: usize) -> Result<Tensor> {
        let (cos, sin) = (self.cos.narrow(0, start, x.dim(1))?, self.sin.narrow(0, start, x.dim(1))?);
        be.rms_norm_rope(x, Some(weight), eps, &cos, &sin, RopePairs::Interleaved)
    }
}

/// `x.to(dtype) * factor` evaluated in `dtype`, as PyTorch does for a bf16 tensor times a scalar:
/// what diffusers' transformer does to the `timestep` (σ) and `guidance` it is given.
pub fn scale_in_dtype(values: &[f32], factor: f32, dtype: DType) -> Vec<f32> {
    let mut v = values.to_vec();
    round_through(&mut v, dtype);
    v.iter_mut().for_each(|x| *x *= factor);
    round_through(&mut v, dtype);
    v
}
