//! `Flux2Transformer2DModel` configuration: from `transformer/config.json`, from the tensor
//! shapes of a BFL single file, or built in (klein 4B / 9B, spec §2.1).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::layout::Layout;
use crate::error::{Error, Result};
use crate::model::positive_finite;
use crate::weights::WeightStore;

/// Far beyond any real model; a larger count is a corrupt config (and would make every tensor
/// listing huge before any size check).
pub const MAX_BLOCKS: usize = 1024;

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

    /// The keys that decide tensor shapes (what `synth` requires a config.json to spell out).
    pub const SHAPE_KEYS: &'static [&'static str] = &[
        "patch_size",
        "in_channels",
        "num_layers",
        "num_single_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "timestep_guidance_channels",
        "mlp_ratio",
        "axes_dims_rope",
        "guidance_embeds",
    ];

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

    /// Sizes must describe a model we can build, and the float settings must be usable (NaN,
    /// infinite, zero or negative values would only show up later as a black image).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let hd = self.attention_head_dim;
        if self.num_attention_heads == 0 || hd == 0 || self.in_channels == 0 || self.joint_attention_dim == 0 {
            return Err("heads, head dim, in_channels and joint_attention_dim must be positive".into());
        }
        if self.num_attention_heads.checked_mul(hd).is_none() {
            return Err(format!("{} heads of dim {hd} overflow the hidden size", self.num_attention_heads));
        }
        if self.out_channels == Some(0) {
            return Err("out_channels must be positive".into());
        }
        if self.num_layers.checked_add(self.num_single_layers).is_none_or(|n| n == 0) {
            return Err("the model needs at least one block (num_layers + num_single_layers)".into());
        }
        if self.num_layers > MAX_BLOCKS || self.num_single_layers > MAX_BLOCKS {
            return Err(format!(
                "{} double and {} single blocks; at most {MAX_BLOCKS} of each are supported",
                self.num_layers, self.num_single_layers
            ));
        }
        if self.axes_dims_rope.is_empty() || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!("axes_dims_rope {:?} must be non-empty and even", self.axes_dims_rope));
        }
        let axes = self.axes_dims_rope.iter().try_fold(0usize, |a, &d| a.checked_add(d));
        if axes != Some(hd) {
            return Err(format!("axes_dims_rope {:?} must add up to attention_head_dim {hd}", self.axes_dims_rope));
        }
        positive_finite("eps", self.eps)?;
        positive_finite("rope_theta", self.rope_theta)?;
        crate::model::bounded_dims(&[
            ("the hidden size (heads x head dim)", self.num_attention_heads * hd),
            ("in_channels", self.in_channels),
            ("joint_attention_dim", self.joint_attention_dim),
        ])?;
        if self.mlp_ratio > 64.0 {
            return Err(format!("mlp_ratio {} is implausibly large", self.mlp_ratio));
        }
        positive_finite("mlp_ratio", self.mlp_ratio)?;
        if self.timestep_guidance_channels < 2 || self.mlp_hidden() == 0 || self.patch_size == 0 {
            return Err("timestep_guidance_channels, mlp_ratio and patch_size must be positive".into());
        }
        if self.patch_size.checked_mul(self.patch_size).and_then(|p| p.checked_mul(self.out_channels())).is_none() {
            return Err(format!("patch_size {} is too large", self.patch_size));
        }
        Ok(())
    }

    /// Infer the config of a diffusers-named single file (e.g. the official FP8 releases) from its
    /// shapes, with the same assumptions as [`TransformerConfig::infer_from_bfl`].
    pub fn infer_from_diffusers(store: &WeightStore) -> Result<Self> {
        infer(store, &DIFFUSERS_KEYS)
    }

    /// Infer the config of a BFL-layout single file from its tensor shapes (spec §2): head dim from
    /// the QK-norm scale, heads = hidden / head dim, 4 equal RoPE axes, theta 2000.
    pub fn infer_from_bfl(store: &WeightStore) -> Result<Self> {
        infer(store, &BFL_KEYS)
    }

    /// The config of a transformer checkpoint: its config.json when there is one, else inferred
    /// from the shapes of its layout.
    pub fn resolve(store: &WeightStore, layout: Layout, config_json: Option<&Path>) -> Result<Self> {
        match (config_json, layout) {
            (Some(p), _) => TransformerConfig::from_json_file(p),
            (None, Layout::Bfl) => TransformerConfig::infer_from_bfl(store),
            (None, Layout::Diffusers) => TransformerConfig::infer_from_diffusers(store),
        }
    }
}

/// The tensors a layout's config is inferred from.
struct ShapeKeys {
    /// `[hidden, in_channels]`.
    img_in: &'static str,
    /// `[hidden, joint_attention_dim]`.
    txt_in: &'static str,
    /// `[hidden, timestep_guidance_channels]`.
    time_in: &'static str,
    /// `[out_channels, hidden]`.
    final_linear: &'static str,
    /// QK-norm scales `[head_dim]` of the first double block, else of the first single block.
    head_norm: [&'static str; 2],
    /// Block i exists when `{prefix}.{i}.{suffix}` does: double, then single blocks.
    double_block: (&'static str, &'static str),
    single_block: (&'static str, &'static str),
    /// `[2·mlp, hidden]` in a double block, else the single block's fused `[3·hidden + 2·mlp, hidden]`.
    double_mlp_in: &'static str,
    single_fused: &'static str,
    guidance: &'static str,
}

const DIFFUSERS_KEYS: ShapeKeys = ShapeKeys {
    img_in: "x_embedder.weight",
    txt_in: "context_embedder.weight",
    time_in: "time_guidance_embed.timestep_embedder.linear_1.weight",
    final_linear: "proj_out.weight",
    head_norm: ["transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight"],
    double_block: ("transformer_blocks", "attn.norm_q.weight"),
    single_block: ("single_transformer_blocks", "attn.norm_q.weight"),
    double_mlp_in: "transformer_blocks.0.ff.linear_in.weight",
    single_fused: "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
    guidance: "time_guidance_embed.guidance_embedder.linear_1.weight",
};

const BFL_KEYS: ShapeKeys = ShapeKeys {
    img_in: "img_in.weight",
    txt_in: "txt_in.weight",
    time_in: "time_in.in_layer.weight",
    final_linear: "final_layer.linear.weight",
    head_norm: ["double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale"],
    double_block: ("double_blocks", "img_attn.qkv.weight"),
    single_block: ("single_blocks", "linear1.weight"),
    double_mlp_in: "double_blocks.0.img_mlp.0.weight",
    single_fused: "single_blocks.0.linear1.weight",
    guidance: "guidance_in.in_layer.weight",
};

fn infer(store: &WeightStore, keys: &ShapeKeys) -> Result<TransformerConfig> {
    let origin = store.origin();
    let [hidden, in_channels] = store.dims::<2>(keys.img_in)?;
    let [head_dim] = store.dims::<1>(keys.head_norm[0]).or_else(|_| store.dims::<1>(keys.head_norm[1]))?;
    if head_dim == 0 || hidden % head_dim != 0 || head_dim % 8 != 0 {
        return Err(Error::config(
            origin,
            format!("hidden size {hidden} and head dim {head_dim} do not fit 4 RoPE axes"),
        ));
    }
    let count = |(prefix, suffix): (&str, &str)| {
        (0..).take_while(|i| store.contains(&format!("{prefix}.{i}.{suffix}"))).count()
    };
    let mlp = match store.dims::<2>(keys.double_mlp_in) {
        Ok([rows, _]) => rows / 2,
        Err(_) => {
            let [rows, _] = store.dims::<2>(keys.single_fused)?;
            rows.checked_sub(3 * hidden).ok_or_else(|| {
                Error::config(
                    origin,
                    format!("`{}` has {rows} rows, fewer than 3 x hidden {hidden}", keys.single_fused),
                )
            })? / 2
        }
    };
    let cfg = TransformerConfig {
        patch_size: 1,
        in_channels,
        out_channels: Some(store.dims::<2>(keys.final_linear)?[0]),
        num_layers: count(keys.double_block),
        num_single_layers: count(keys.single_block),
        attention_head_dim: head_dim,
        num_attention_heads: hidden / head_dim,
        joint_attention_dim: store.dims::<2>(keys.txt_in)?[1],
        timestep_guidance_channels: store.dims::<2>(keys.time_in)?[1],
        mlp_ratio: ratio_for(mlp, hidden),
        axes_dims_rope: vec![head_dim / 4; 4],
        rope_theta: 2000.0,
        eps: 1e-6,
        guidance_embeds: store.contains(keys.guidance),
    };
    cfg.validate().map_err(|reason| Error::config(origin, reason))?;
    Ok(cfg)
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
