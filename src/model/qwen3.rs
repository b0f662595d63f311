//! The Qwen3 text encoder as klein uses it (spec §6): token embeddings, then only the decoder
//! layers needed for the requested hidden states (9, 18, 27 by default: no final norm, no
//! lm_head), concatenated per token into the `[B, L, 3·hidden]` context.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::linear::{format_for, Linear};
use super::rope::qwen_tables;
use super::tokenizer::{PromptTokenizer, TokenizedPrompt, MAX_TOKENS};
use crate::backend::{AttnMask, Backend, RopePairs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::positive_finite;
use crate::quant::EncoderPrecision;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// `text_encoder_out_layers` of the klein pipelines (indices into `hidden_states`, where 0 is the
/// embedding output and k the output of decoder layer k-1).
pub const KLEIN_OUT_LAYERS: [usize; 3] = [9, 18, 27];

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_act() -> String {
    "silu".into()
}

impl Qwen3Config {
    pub fn qwen3_4b() -> Self {
        Qwen3Config {
            vocab_size: 151936,
            hidden_size: 2560,
            intermediate_size: 9728,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: Some(8),
            head_dim: Some(128),
            rms_norm_eps: 1e-6,
            rope_theta: Some(1_000_000.0),
            rope_parameters: None,
            rope_scaling: None,
            attention_bias: false,
            tie_word_embeddings: true,
            hidden_act: "silu".into(),
            use_sliding_window: false,
        }
    }

    pub fn qwen3_8b() -> Self {
        Qwen3Config { hidden_size: 4096, intermediate_size: 12288, tie_word_embeddings: false, ..Self::qwen3_4b() }
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Qwen3Config =
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("bad Qwen3 config: {e}")))?;
        cfg.validate().map_err(|r| Error::config(path, r))?;
        Ok(cfg)
    }

    /// The config of a weights file without config.json, read off its shapes (sizes, heads,
    /// layers), with Qwen3's RoPE base and norm epsilon, or those a GGUF file's metadata states.
    /// The store's prefix must already point at the decoder (`embed_tokens.weight`, `layers.N.`).
    pub fn infer(store: &WeightStore) -> Result<Self> {
        let [vocab_size, hidden_size] = store.dims::<2>("embed_tokens.weight")?;
        let num_hidden_layers =
            (0..).take_while(|n| store.contains(&format!("layers.{n}.input_layernorm.weight"))).count();
        if num_hidden_layers == 0 {
            return Err(Error::config(store.origin(), "no decoder layers (`layers.0.input_layernorm.weight`) found"));
        }
        let [head_dim] = store.dims::<1>("layers.0.self_attn.q_norm.weight")?;
        let rows = |name: &str| store.dims::<2>(name).map(|[r, _]| r);
        let (q, k) = (rows("layers.0.self_attn.q_proj.weight")?, rows("layers.0.self_attn.k_proj.weight")?);
        if head_dim == 0 || q % head_dim != 0 || k % head_dim != 0 {
            return Err(Error::config(
                store.origin(),
                format!("q/k projections of {q}/{k} rows do not split into heads of {head_dim}"),
            ));
        }
        let meta = |key: &str| -> Option<f64> {
            store.gguf_files().iter().find_map(|f| f.metadata.get(key).and_then(|v| v.as_f64()))
        };
        let cfg = Qwen3Config {
            vocab_size,
            hidden_size,
            intermediate_size: rows("layers.0.mlp.gate_proj.weight")?,
            num_hidden_layers,
            num_attention_heads: q / head_dim,
            num_key_value_heads: Some(k / head_dim),
            head_dim: Some(head_dim),
            rms_norm_eps: meta("qwen3.attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta: Some(meta("qwen3.rope.freq_base").unwrap_or(1_000_000.0)),
            attention_bias: store.contains("layers.0.self_attn.q_proj.bias"),
            tie_word_embeddings: false,
            ..Qwen3Config::qwen3_4b()
        };
        cfg.validate().map_err(|r| Error::config(store.origin(), r))?;
        Ok(cfg)
    }

    /// The keys that decide tensor shapes (what `synth` requires a config.json to spell out;
    /// the others have no default at all).
    pub const SHAPE_KEYS: &'static [&'static str] = &["num_key_value_heads", "head_dim"];

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// RoPE base: `rope_theta`, or `rope_parameters.rope_theta` (transformers 5), default 10000.
    pub fn theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()).unwrap_or(10_000.0)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {} is not supported (Qwen3 uses silu)", self.hidden_act));
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type"))
            .or_else(|| self.rope_scaling.as_ref().and_then(|p| p.get("rope_type").or_else(|| p.get("type"))))
            .and_then(|t| t.as_str());
        if let Some(t) = rope_type {
            if t != "default" {
                return Err(format!("RoPE scaling `{t}` is not supported"));
            }
        }
        if self.use_sliding_window {
            return Err("sliding-window attention is not supported".into());
        }
        if self.num_attention_heads == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return Err(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        crate::model::bounded_dims(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
        ])?;
        if self.num_hidden_layers > crate::model::transformer::config::MAX_BLOCKS {
            return Err(format!("num_hidden_layers {} is implausibly large", self.num_hidden_layers));
        }
        // Without an explicit head_dim the heads split hidden_size, so they must divide it.
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim is given)",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return Err(format!("head_dim {hd} must be positive and even (RoPE rotates pairs)"));
        }
        let projections = self.kv_heads().checked_mul(2).and_then(|kv| kv.checked_add(self.num_attention_heads));
        if projections.and_then(|n| n.checked_mul(hd)).is_none() {
            return Err(format!("{} heads of dim {hd} overflow the projection size", self.num_attention_heads));
        }
        positive_finite("rms_norm_eps", self.rms_norm_eps)?;
        positive_finite("rope_theta", self.theta())?;
        Ok(())
    }
}

/// A text encoder's weights (looked up under the decoder's prefix) and config: config.json in a
/// `text_encoder/` folder, else read off the shapes of the weights file.
pub fn open(path: &Path) -> Result<(WeightStore, Qwen3Config)> {
    let mut store = WeightStore::open(path)?;
    set_qwen3_prefix(&mut store)?;
    let config = path.join("config.json");
    let cfg = if path.is_dir() && config.is_file() {
        Qwen3Config::from_json_file(&config)?
    } else {
        Qwen3Config::infer(&store)?
    };
    Ok((store, cfg))
}

/// Point the store at the decoder's tensors: whatever precedes `embed_tokens.weight` (`model.` in
/// Hugging Face files, other prefixes in repackaged ones) becomes the lookup prefix.
fn set_qwen3_prefix(store: &mut WeightStore) -> Result<()> {
    let mut prefixes: Vec<String> =
        store.keys().filter_map(|k| k.strip_suffix("embed_tokens.weight")).map(str::to_string).collect();
    prefixes.sort_by_key(|p| p.len());
    match prefixes.first() {
        Some(p) => {
            let p = p.clone();
            store.set_prefix(&p);
            Ok(())
        }
        None => Err(Error::config(store.origin(), "not a Qwen3 text encoder: no `embed_tokens.weight` tensor")),
    }
}

struct Layer {
    input_norm: Tensor,
    /// q, k, v projections fused row-wise: one GEMM.
    qkv: Linear,
    qkv_bias: Option<Tensor>,
    q_norm: Tensor,
    k_norm: Tensor,
    o: Linear,
    o_bias: Option<Tensor>,
    post_norm: Tensor,
    /// gate and up projections fused row-wise (gate first), so SwiGLU applies directly.
    gate_up: Linear,
    down: Linear,
}

pub struct Qwen3TextEncoder {
    be: Arc<dyn Backend>,
    cfg: Qwen3Config,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Option<Tensor>,
    out_layers: Vec<usize>,
}

impl Qwen3TextEncoder {
    /// Load from a `text_encoder/` folder (config.json + safetensors, sharded or not), keeping
    /// only what `out_layers` needs, with bf16 weights.
    pub fn load(be: Arc<dyn Backend>, dir: &Path, out_layers: &[usize]) -> Result<Qwen3TextEncoder> {
        Qwen3TextEncoder::load_with(be, dir, out_layers, EncoderPrecision::Bf16)
    }

    /// As [`Qwen3TextEncoder::load`], with the decoder layers' linears stored in `precision`
    /// (quantized at load; embeddings and norms stay bf16). `path` is a `text_encoder/` folder
    /// (config.json + weights), or one weights file (a ComfyUI `qwen_3_4b.safetensors`, a GGUF
    /// with llama.cpp names) whose config is read off its shapes.
    pub fn load_with(
        be: Arc<dyn Backend>,
        path: &Path,
        out_layers: &[usize],
        precision: EncoderPrecision,
    ) -> Result<Qwen3TextEncoder> {
        let (store, cfg) = open(path)?;
        Qwen3TextEncoder::from_store(be, &store, cfg, out_layers, precision)
    }

    pub fn from_store(
        be: Arc<dyn Backend>,
        store: &WeightStore,
        cfg: Qwen3Config,
        out_layers: &[usize],
        precision: EncoderPrecision,
    ) -> Result<Self> {
        cfg.validate().map_err(|r| Error::config(store.origin(), r))?;
        let deepest = *out_layers.iter().max().ok_or_else(|| Error::InvalidArgument("no output layers".into()))?;
        if deepest > cfg.num_hidden_layers {
            return Err(Error::config(
                store.origin(),
                format!("hidden state {deepest} requested but the encoder has {} layers", cfg.num_hidden_layers),
            ));
        }
        let b: &dyn Backend = &*be;
        let (h, hd, nq, nkv, inter) =
            (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads(), cfg.intermediate_size);
        // Layers past the deepest requested hidden state are never run, so never loaded.
        let run = deepest.min(cfg.num_hidden_layers);
        let layers = (0..run)
            .map(|n| {
                let p = |s: &str| format!("layers.{n}.{s}");
                let load = |s: &str, shape: &[usize]| store.load(b, &p(s), shape);
                let concat = |parts: Vec<Tensor>| b.concat(&parts.iter().collect::<Vec<_>>(), 0);
                let fmt = format_for(precision);
                let (q, k, v) =
                    (p("self_attn.q_proj.weight"), p("self_attn.k_proj.weight"), p("self_attn.v_proj.weight"));
                let qkv = Linear::load(b, store, &[(&q, nq * hd), (&k, nkv * hd), (&v, nkv * hd)], h, fmt)?;
                let (qkv_bias, o_bias) = if cfg.attention_bias {
                    let bias = concat(vec![
                        load("self_attn.q_proj.bias", &[nq * hd])?,
                        load("self_attn.k_proj.bias", &[nkv * hd])?,
                        load("self_attn.v_proj.bias", &[nkv * hd])?,
                    ])?;
                    (Some(bias), Some(load("self_attn.o_proj.bias", &[h])?))
                } else {
                    (None, None)
                };
                Ok(Layer {
                    input_norm: load("input_layernorm.weight", &[h])?,
                    qkv,
                    qkv_bias,
                    q_norm: load("self_attn.q_norm.weight", &[hd])?,
                    k_norm: load("self_attn.k_norm.weight", &[hd])?,
                    o: Linear::load(b, store, &[(&p("self_attn.o_proj.weight"), h)], nq * hd, fmt)?,
                    o_bias,
                    post_norm: load("post_attention_layernorm.weight", &[h])?,
                    gate_up: Linear::load(
                        b,
                        store,
                        &[(&p("mlp.gate_proj.weight"), inter), (&p("mlp.up_proj.weight"), inter)],
                        h,
                        fmt,
                    )?,
                    down: Linear::load(b, store, &[(&p("mlp.down_proj.weight"), h)], inter, fmt)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm =
            if deepest == cfg.num_hidden_layers { Some(store.load(b, "norm.weight", &[h])?) } else { None };
        let embed = store.load(b, "embed_tokens.weight", &[cfg.vocab_size, h])?;
        Ok(Qwen3TextEncoder { be, cfg, embed, layers, final_norm, out_layers: out_layers.to_vec() })
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.cfg
    }

    /// Width of the context vector: `out_layers.len() · hidden`.
    pub fn context_dim(&self) -> usize {
        self.out_layers.len() * self.cfg.hidden_size
    }

    /// Tokenize and encode prompts (one row each) -> `[B, 512, context_dim]`.
    pub fn encode_prompts(&self, tokenizer: &PromptTokenizer, prompts: &[&str]) -> Result<Tensor> {
        let tokens: Vec<TokenizedPrompt> =
            prompts.iter().map(|p| tokenizer.encode_prompt(p, MAX_TOKENS)).collect::<Result<_>>()?;
        self.forward(&tokens)
    }

    /// Encode right-padded token rows of equal length.
    pub fn forward(&self, tokens: &[TokenizedPrompt]) -> Result<Tensor> {
        let be = &*self.be;
        let cfg = &self.cfg;
        let b = tokens.len();
        let l = tokens.first().map_or(0, |t| t.ids.len());
        if b == 0 || l == 0 || tokens.iter().any(|t| t.ids.len() != l || t.mask.len() != l) {
            return Err(Error::shape("text encoder", "token rows must be non-empty and of equal length"));
        }
        let valid_len = tokens.iter().map(|t| padding_length(&t.mask)).collect::<Result<Vec<_>>>()?;
        let (h, hd, nq, nkv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
        let eps = cfg.rms_norm_eps as f32;
        let _scope = crate::backend::scope::enter(|| "text_encoder".into());
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let mut x = be.embedding(&ids, &self.embed)?.reshape(&[b, l, h])?;

        let (cos, sin) = qwen_tables(l, hd, cfg.theta());
        let cos = be.upload(&Tensor::from_f32(cos, &[l, hd / 2])?, DType::F32)?;
        let sin = be.upload(&Tensor::from_f32(sin, &[l, hd / 2])?, DType::F32)?;
        let mask = AttnMask::Causal { valid_len: Some(valid_len) };
        let scale = 1.0 / (hd as f32).sqrt();

        let mut outputs: Vec<(usize, Tensor)> = Vec::new();
        let mut keep = |index: usize, t: &Tensor| {
            if self.out_layers.contains(&index) {
                outputs.push((index, t.clone()));
            }
        };
        keep(0, &x);
        for (n, layer) in self.layers.iter().enumerate() {
            let _layer = crate::backend::scope::enter(|| format!("layers.{n}"));
            let hn = be.rms_norm(&x, Some(&layer.input_norm), eps)?;
            let qkv = layer.qkv.forward(be, &hn, layer.qkv_bias.as_ref())?;
            let q = qkv.narrow(2, 0, nq * hd)?.reshape(&[b, l, nq, hd])?;
            let k = qkv.narrow(2, nq * hd, nkv * hd)?.reshape(&[b, l, nkv, hd])?;
            let v = qkv.narrow(2, (nq + nkv) * hd, nkv * hd)?.reshape(&[b, l, nkv, hd])?;
            let q = be.rms_norm_rope(&q, Some(&layer.q_norm), eps, &cos, &sin, RopePairs::Halves)?;
            let k = be.rms_norm_rope(&k, Some(&layer.k_norm), eps, &cos, &sin, RopePairs::Halves)?;
            let attn = be.attention(&q, &k, &v, &mask, scale)?.reshape(&[b, l, nq * hd])?;
            x = be.axpby(1.0, &x, 1.0, &layer.o.forward(be, &attn, layer.o_bias.as_ref())?)?;
            let h2 = be.rms_norm(&x, Some(&layer.post_norm), eps)?;
            let mlp = layer.down.forward(be, &be.swiglu(&layer.gate_up.forward(be, &h2, None)?)?, None)?;
            x = be.axpby(1.0, &x, 1.0, &mlp)?;
            if n + 1 == cfg.num_hidden_layers {
                // hidden_states[num_layers] is the final-norm output.
                if let Some(norm) = &self.final_norm {
                    x = be.rms_norm(&x, Some(norm), eps)?;
                }
            }
            keep(n + 1, &x);
        }
        // In the order requested (hs9 | hs18 | hs27 per token).
        let ordered: Vec<&Tensor> = self
            .out_layers
            .iter()
            .map(|i| &outputs.iter().find(|(j, _)| j == i).expect("every requested layer ran").1)
            .collect();
        be.concat(&ordered, 2)
    }
}

/// Number of real tokens of a right-padded mask (ones, then zeros).
fn padding_length(mask: &[u8]) -> Result<usize> {
    let n = mask.iter().take_while(|&&m| m != 0).count();
    if mask[n..].iter().any(|&m| m != 0) {
        return Err(Error::InvalidArgument("attention_mask must be right-padded (ones, then zeros)".into()));
    }
    if n == 0 {
        return Err(Error::InvalidArgument("attention_mask has no real token".into()));
    }
    Ok(n)
}

/// Every tensor of a Hugging Face `Qwen3ForCausalLM` checkpoint.
pub fn tensors(cfg: &Qwen3Config) -> Vec<crate::weights::TensorSpec> {
    use crate::weights::TensorSpec;
    let (h, hd, nq, nkv, inter) =
        (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads(), cfg.intermediate_size);
    let mut v = vec![TensorSpec::new("model.embed_tokens.weight", &[cfg.vocab_size, h])];
    for n in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{n}.{s}");
        v.push(TensorSpec::new(p("input_layernorm.weight"), &[h]));
        v.push(TensorSpec::new(p("self_attn.q_proj.weight"), &[nq * hd, h]));
        v.push(TensorSpec::new(p("self_attn.k_proj.weight"), &[nkv * hd, h]));
        v.push(TensorSpec::new(p("self_attn.v_proj.weight"), &[nkv * hd, h]));
        if cfg.attention_bias {
            v.push(TensorSpec::new(p("self_attn.q_proj.bias"), &[nq * hd]));
            v.push(TensorSpec::new(p("self_attn.k_proj.bias"), &[nkv * hd]));
            v.push(TensorSpec::new(p("self_attn.v_proj.bias"), &[nkv * hd]));
        }
        v.push(TensorSpec::new(p("self_attn.o_proj.weight"), &[h, nq * hd]));
        if cfg.attention_bias {
            v.push(TensorSpec::new(p("self_attn.o_proj.bias"), &[h]));
        }
        v.push(TensorSpec::new(p("self_attn.q_norm.weight"), &[hd]));
        v.push(TensorSpec::new(p("self_attn.k_norm.weight"), &[hd]));
        v.push(TensorSpec::new(p("post_attention_layernorm.weight"), &[h]));
        v.push(TensorSpec::new(p("mlp.gate_proj.weight"), &[inter, h]));
        v.push(TensorSpec::new(p("mlp.up_proj.weight"), &[inter, h]));
        v.push(TensorSpec::new(p("mlp.down_proj.weight"), &[h, inter]));
    }
    v.push(TensorSpec::new("model.norm.weight", &[h]));
    if !cfg.tie_word_embeddings {
        v.push(TensorSpec::new("lm_head.weight", &[cfg.vocab_size, h]));
    }
    v
}
