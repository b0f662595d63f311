//! `Flux2Transformer2DModel` configuration: from `transformer/config.json`, from the tensor
//! shapes of a BFL single file, or built in (klein 4B / 9B, spec §2.1).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::weights::WeightStore;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the text features (3 × the text encoder's hidden size).
    pub joint_attention_dim: usize,
    pub timestep_guidance_channels: usize,
    pub mlp_ratio: f64,
    pub axes_dims_rope: Vec<usize>,
    pub rope_theta: f64,
    pub eps: f64,
    pub guidance_embeds: bool,
}

/// diffusers' constructor defaults (FLUX.2 [dev] sizes), used for keys a config.json omits.
impl Default for TransformerConfig {
    fn default() -> Self {
        TransformerConfig {
            patch_size: 1,
            in_channels: 128,
            out_channels: None,
            num_layers: 8,
            num_single_layers: 48,
            attention_head_dim: 128,
            num_attention_heads: 48,
            joint_attention_dim: 15360,
            timestep_guidance_channels: 256,
            mlp_ratio: 3.0,
            axes_dims_rope: vec![32, 32, 32, 32],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: true,
        }
    }
}

impl TransformerConfig {
    pub fn klein_4b() -> Self {
        TransformerConfig {
            num_layers: 5,
            num_single_layers: 20,
            num_attention_heads: 24,
            joint_attention_dim: 7680,
            guidance_embeds: false,
            ..Default::default()
        }
    }

    pub fn klein_9b() -> Self {
        TransformerConfig {
            num_layers: 8,
            num_single_layers: 24,
            num_attention_heads: 32,
            joint_attention_dim: 12288,
            guidance_embeds: false,
            ..Default::default()
        }
    }

    /// Hidden size D.
    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// MLP hidden size M = int(D · mlp_ratio), as diffusers truncates it.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden() as f64 * self.mlp_ratio) as usize
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Width of `proj_out`'s output.
    pub fn out_features(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels()
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
        if let Some(class) = value.get("_class_name").and_then(|c| c.as_str()) {
            if class != "Flux2Transformer2DModel" {
                return Err(Error::config(path, format!("this is a {class}, not a Flux2Transformer2DModel")));
            }
        }
        let cfg: TransformerConfig =
            serde_json::from_value(value).map_err(|e| Error::config(path, format!("bad transformer config: {e}")))?;
        cfg.validate().map_err(|reason| Error::config(path, reason))?;
        Ok(cfg)
    }

    /// Sizes must describe a model we can build.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let hd = self.attention_head_dim;
        if self.num_attention_heads == 0 || hd == 0 || self.in_channels == 0 || self.joint_attention_dim == 0 {
            return Err("heads, head dim, in_channels and joint_attention_dim must be positive".into());
        }
        if self.axes_dims_rope.is_empty() || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!("axes_dims_rope {:?} must be non-empty and even", self.axes_dims_rope));
        }
        if self.axes_dims_rope.iter().sum::<usize>() != hd {
            return Err(format!("axes_dims_rope {:?} must add up to attention_head_dim {hd}", self.axes_dims_rope));
        }
        if self.timestep_guidance_channels < 2 || self.mlp_hidden() == 0 || self.patch_size == 0 {
            return Err("timestep_guidance_channels, mlp_ratio and patch_size must be positive".into());
        }
        Ok(())
    }

    /// Infer the config of a diffusers-named single file (e.g. the official FP8 releases) from its
    /// shapes, with the same assumptions as [`TransformerConfig::infer_from_bfl`].
    pub fn infer_from_diffusers(store: &WeightStore) -> Result<Self> {
        let origin = store.origin();
        let shape = |k: &str| store.shape(k);
        let x = shape("x_embedder.weight")?;
        let head_dim = shape("transformer_blocks.0.attn.norm_q.weight")
            .or_else(|_| shape("single_transformer_blocks.0.attn.norm_q.weight"))?[0];
        let hidden = x[0];
        if head_dim == 0 || hidden % head_dim != 0 || head_dim % 8 != 0 {
            return Err(Error::config(
                origin,
                format!("hidden size {hidden} and head dim {head_dim} do not fit 4 RoPE axes"),
            ));
        }
        let count = |f: &dyn Fn(usize) -> String| (0..).take_while(|i| store.contains(&f(*i))).count();
        let mlp = shape("transformer_blocks.0.ff.linear_in.weight").map(|s| s[0] / 2).or_else(|_| {
            shape("single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight").map(|s| (s[0] - 3 * hidden) / 2)
        })?;
        let cfg = TransformerConfig {
            patch_size: 1,
            in_channels: x[1],
            out_channels: Some(shape("proj_out.weight")?[0]),
            num_layers: count(&|i| format!("transformer_blocks.{i}.attn.norm_q.weight")),
            num_single_layers: count(&|i| format!("single_transformer_blocks.{i}.attn.norm_q.weight")),
            attention_head_dim: head_dim,
            num_attention_heads: hidden / head_dim,
            joint_attention_dim: shape("context_embedder.weight")?[1],
            timestep_guidance_channels: shape("time_guidance_embed.timestep_embedder.linear_1.weight")?[1],
            mlp_ratio: ratio_for(mlp, hidden),
            axes_dims_rope: vec![head_dim / 4; 4],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: store.contains("time_guidance_embed.guidance_embedder.linear_1.weight"),
        };
        cfg.validate().map_err(|reason| Error::config(origin, reason))?;
        Ok(cfg)
    }

    /// Infer the config of a BFL-layout single file from its tensor shapes (spec §2): head dim from
    /// the QK-norm scale, heads = hidden / head dim, 4 equal RoPE axes, theta 2000.
    pub fn infer_from_bfl(store: &WeightStore) -> Result<Self> {
        let origin = store.origin();
        let shape = |k: &str| store.shape(k);
        let img_in = shape("img_in.weight")?;
        let txt_in = shape("txt_in.weight")?;
        let time_in = shape("time_in.in_layer.weight")?;
        let final_linear = shape("final_layer.linear.weight")?;
        let hd = shape("double_blocks.0.img_attn.norm.query_norm.scale")
            .or_else(|_| shape("single_blocks.0.norm.query_norm.scale"))?;
        let (hidden, head_dim) = (img_in[0], hd[0]);
        if head_dim == 0 || hidden % head_dim != 0 || head_dim % 8 != 0 {
            return Err(Error::config(
                origin,
                format!("hidden size {hidden} and head dim {head_dim} do not fit 4 RoPE axes"),
            ));
        }
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| {
                    store.contains(&format!(
                        "{prefix}.{i}.{}",
                        if prefix == "double_blocks" { "img_attn.qkv.weight" } else { "linear1.weight" }
                    ))
                })
                .count()
        };
        let mlp_in = shape("double_blocks.0.img_mlp.0.weight").or_else(|_| -> Result<Vec<usize>> {
            let l1 = shape("single_blocks.0.linear1.weight")?;
            Ok(vec![l1[0] - 3 * hidden, hidden])
        })?;
        let cfg = TransformerConfig {
            patch_size: 1,
            in_channels: img_in[1],
            out_channels: Some(final_linear[0]),
            num_layers: count("double_blocks"),
            num_single_layers: count("single_blocks"),
            attention_head_dim: head_dim,
            num_attention_heads: hidden / head_dim,
            joint_attention_dim: txt_in[1],
            timestep_guidance_channels: time_in[1],
            mlp_ratio: ratio_for(mlp_in[0] / 2, hidden),
            axes_dims_rope: vec![head_dim / 4; 4],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: store.contains("guidance_in.in_layer.weight"),
        };
        cfg.validate().map_err(|reason| Error::config(origin, reason))?;
        Ok(cfg)
    }
}

/// A ratio r with int(hidden · r) == mlp exactly (M/D itself when that round-trips).
fn ratio_for(mlp: usize, hidden: usize) -> f64 {
    let r = mlp as f64 / hidden as f64;
    if (hidden as f64 * r) as usize == mlp {
        r
    } else {
        (mlp as f64 + 0.5) / hidden as f64
    }
}
