//! The FLUX.2 VAE (`AutoencoderKLFlux2`, spec §5): ResNet encoder/decoder with GroupNorm,
//! asymmetric-pad downsampling, nearest upsampling and a single-head mid attention; plus the
//! 2×2 patchify and the BatchNorm latent (de)normalisation the pipeline applies around it.
//! Loads the diffusers layout (`vae/`) and BFL's `ae.safetensors`.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::backend::{AttnMask, Backend, Padding2d};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::positive_finite;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

const RESNET_EPS: f32 = 1e-6;

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Option<Vec<usize>>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub batch_norm_eps: f64,
    pub patch_size: Vec<usize>,
}

/// diffusers' `AutoencoderKLFlux2` defaults, which are the FLUX.2 VAE.
impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            decoder_block_out_channels: None,
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 32,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            batch_norm_eps: 1e-4,
            patch_size: vec![2, 2],
        }
    }
}

impl VaeConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: VaeConfig =
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("bad VAE config: {e}")))?;
        cfg.validate().map_err(|r| Error::config(path, r))?;
        Ok(cfg)
    }

    /// The keys that decide tensor shapes (what `synth` requires a config.json to spell out).
    pub const SHAPE_KEYS: &'static [&'static str] = &[
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
    ];

    pub fn decoder_channels(&self) -> &[usize] {
        self.decoder_block_out_channels.as_deref().unwrap_or(&self.block_out_channels)
    }

    /// Pixels per latent pixel: 2^(levels - 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Pixels per transformer token side (VAE factor × 2×2 patch): 16 for FLUX.2. Image sizes
    /// must be multiples of it.
    pub fn pixel_multiple(&self) -> usize {
        self.scale_factor() * 2
    }

    /// Channels of the patchified latent the transformer sees.
    pub fn packed_channels(&self) -> usize {
        self.latent_channels * self.patch_size.iter().product::<usize>()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let levels = self.block_out_channels.len();
        if levels == 0 || self.decoder_channels().len() != levels {
            return Err("block_out_channels (and decoder_block_out_channels) must have one entry per level".into());
        }
        if self.down_block_types.len() != levels || self.down_block_types.iter().any(|t| t != "DownEncoderBlock2D") {
            return Err(format!("down_block_types {:?} are not supported", self.down_block_types));
        }
        if self.up_block_types.len() != levels || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") {
            return Err(format!("up_block_types {:?} are not supported", self.up_block_types));
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn {} is not supported", self.act_fn));
        }
        if self.patch_size != [2, 2] {
            return Err(format!("patch_size {:?} is not supported (FLUX.2 uses 2x2)", self.patch_size));
        }
        // More levels than this cannot be a VAE (and 2^(levels - 1) must not overflow).
        if levels > 16 {
            return Err(format!("{levels} levels in block_out_channels; at most 16 are supported"));
        }
        let sizes = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.block_out_channels.iter().chain(self.decoder_channels()).any(|&c| c == 0) {
            return Err("every entry of block_out_channels must be positive".into());
        }
        let channels = self.block_out_channels.iter().chain(self.decoder_channels());
        crate::model::bounded_dims(&channels.map(|&c| ("block_out_channels", c)).collect::<Vec<_>>())?;
        crate::model::bounded_dims(&[("latent_channels", self.latent_channels), ("in_channels", self.in_channels)])?;
        if self.latent_channels.checked_mul(4).is_none() {
            return Err(format!("latent_channels {} is too large", self.latent_channels));
        }
        positive_finite("batch_norm_eps", self.batch_norm_eps)?;
        let g = self.norm_num_groups;
        if g == 0 || self.block_out_channels.iter().chain(self.decoder_channels()).any(|c| c % g != 0) {
            return Err(format!("every channel count must be a multiple of norm_num_groups {g}"));
        }
        Ok(())
    }

    /// Infer the config of BFL's `ae.safetensors` from its shapes (groups: BFL's fixed 32).
    pub fn infer_from_bfl(store: &WeightStore) -> Result<Self> {
        VaeConfig::infer(store, VaeLayout::Bfl, 32)
    }

    /// Infer the config of a diffusers-named VAE file without config.json (a repackaged
    /// `flux2-vae.safetensors`) from its shapes; the norms' group count, which no weight shows,
    /// is given; the rest are the FLUX.2 VAE's defaults.
    pub fn infer_from_diffusers(store: &WeightStore, norm_num_groups: usize) -> Result<Self> {
        VaeConfig::infer(store, VaeLayout::Diffusers, norm_num_groups)
    }

    /// The config read off a VAE file's shapes in either layout (keys named the diffusers way,
    /// mapped to BFL's by `bfl_key`).
    fn infer(store: &WeightStore, layout: VaeLayout, norm_num_groups: usize) -> Result<Self> {
        // Encoder keys and the convolutions used here do not depend on the level count.
        let key = |name: &str| match layout {
            VaeLayout::Diffusers => name.to_string(),
            VaeLayout::Bfl => bfl_key(name, 0),
        };
        let has = |name: &str| store.contains(&key(name));
        let conv = |name: &str| store.dims::<4>(&key(name));
        let levels = (0..).take_while(|i| has(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))).count();
        let channels = (0..levels)
            .map(|i| Ok(conv(&format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"))?[0]))
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..).take_while(|j| has(&format!("encoder.down_blocks.0.resnets.{j}.conv1.weight"))).count();
        let cfg = VaeConfig {
            in_channels: conv("encoder.conv_in.weight")?[1],
            out_channels: conv("decoder.conv_out.weight")?[0],
            down_block_types: vec!["DownEncoderBlock2D".into(); levels],
            up_block_types: vec!["UpDecoderBlock2D".into(); levels],
            block_out_channels: channels,
            layers_per_block: layers,
            latent_channels: conv("decoder.conv_in.weight")?[1],
            use_quant_conv: has("quant_conv.weight"),
            use_post_quant_conv: has("post_quant_conv.weight"),
            mid_block_add_attention: has("encoder.mid_block.attentions.0.to_q.weight"),
            norm_num_groups,
            ..VaeConfig::default()
        };
        cfg.validate().map_err(|r| {
            Error::config(
                store.origin(),
                format!("{r} (a VAE file without config.json is taken as FLUX.2's, with {norm_num_groups} norm groups; give its folder with config.json instead)"),
            )
        })?;
        Ok(cfg)
    }
}

/// A VAE's weights, layout and config: a diffusers `vae/` folder (config.json), a diffusers-named
/// file (config inferred from shapes), or BFL's `ae.safetensors`.
pub fn open(path: &Path) -> Result<(WeightStore, VaeLayout, VaeConfig)> {
    let mut store = WeightStore::open(path)?;
    // Repackaged files may nest the VAE (`vae.`, `first_stage_model.`): look under whatever
    // precedes the decoder's first convolution.
    let mut prefixes: Vec<String> =
        store.keys().filter_map(|k| k.strip_suffix("decoder.conv_in.weight")).map(str::to_string).collect();
    prefixes.sort_by_key(|p| p.len());
    if let Some(p) = prefixes.first().cloned() {
        store.set_prefix(&p);
    }
    let (cfg, layout) = if store.contains("encoder.down_blocks.0.resnets.0.conv1.weight")
        || store.contains("decoder.up_blocks.0.resnets.0.conv1.weight")
    {
        let config = if path.is_dir() { path.join("config.json") } else { path.with_file_name("config.json") };
        let cfg = if config.is_file() {
            VaeConfig::from_json_file(&config)?
        } else {
            // The group count of the norms is not in the weights: FLUX.2's 32.
            VaeConfig::infer_from_diffusers(&store, VaeConfig::default().norm_num_groups)?
        };
        (cfg, VaeLayout::Diffusers)
    } else if store.contains("encoder.conv_in.weight") && store.contains("decoder.conv_in.weight") {
        (VaeConfig::infer_from_bfl(&store)?, VaeLayout::Bfl)
    } else {
        return Err(Error::config(path, "not a FLUX.2 VAE checkpoint (no encoder/decoder weights found)"));
    };
    Ok((store, layout, cfg))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeLayout {
    Diffusers,
    Bfl,
}

/// diffusers VAE key -> BFL `ae.safetensors` key (spec §8.3).
pub fn bfl_key(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        match p {
            "down_blocks" => {
                out.push(format!("down.{}", parts[i + 1]));
                i += 2;
                if parts.get(i) == Some(&"downsamplers") {
                    out.push("downsample".into());
                    i += 2; // skip "0"
                }
                continue;
            }
            "up_blocks" => {
                let k: usize = parts[i + 1].parse().unwrap_or(0);
                out.push(format!("up.{}", levels - 1 - k));
                i += 2;
                if parts.get(i) == Some(&"upsamplers") {
                    out.push("upsample".into());
                    i += 2;
                }
                continue;
            }
            "resnets" => {
                let j = parts[i + 1];
                if out.last().is_some_and(|l| l == "mid") {
                    out.push(if j == "0" { "block_1".into() } else { "block_2".into() });
                } else {
                    out.push(format!("block.{j}"));
                }
                i += 2;
                continue;
            }
            "mid_block" => out.push("mid".into()),
            "attentions" => {
                out.push("attn_1".into());
                i += 2;
                continue;
            }
            "group_norm" => out.push("norm".into()),
            "to_q" => out.push("q".into()),
            "to_k" => out.push("k".into()),
            "to_v" => out.push("v".into()),
            "to_out" => {
                out.push("proj_out".into());
                i += 2;
                continue;
            }
            "conv_shortcut" => out.push("nin_shortcut".into()),
            "conv_norm_out" => out.push("norm_out".into()),
            "quant_conv" if i == 0 => out.push("encoder.quant_conv".into()),
            "post_quant_conv" if i == 0 => out.push("decoder.post_quant_conv".into()),
            _ => out.push(p.into()),
        }
        i += 1;
    }
    out.join(".")
}

struct Loader<'a> {
    store: &'a WeightStore,
    layout: VaeLayout,
    levels: usize,
    be: &'a dyn Backend,
}

impl Loader<'_> {
    fn key(&self, name: &str) -> String {
        match self.layout {
            VaeLayout::Diffusers => name.to_string(),
            VaeLayout::Bfl => bfl_key(name, self.levels),
        }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.load(self.be, &self.key(name), shape)
    }

    fn conv(&self, name: &str, cout: usize, cin: usize, k: usize) -> Result<Conv> {
        Ok(Conv {
            w: self.tensor(&format!("{name}.weight"), &[cout, cin, k, k])?,
            b: self.tensor(&format!("{name}.bias"), &[cout])?,
        })
    }

    fn norm(&self, name: &str, c: usize) -> Result<Norm> {
        Ok(Norm { w: self.tensor(&format!("{name}.weight"), &[c])?, b: self.tensor(&format!("{name}.bias"), &[c])? })
    }

    /// A channel-mixing projection: Linear [C, C] in diffusers, 1×1 Conv [C, C, 1, 1] in BFL.
    fn proj(&self, name: &str, c: usize) -> Result<(Tensor, Tensor)> {
        let w = match self.layout {
            VaeLayout::Diffusers => self.tensor(&format!("{name}.weight"), &[c, c])?,
            VaeLayout::Bfl => self.tensor(&format!("{name}.weight"), &[c, c, 1, 1])?.reshape(&[c, c])?,
        };
        Ok((w, self.tensor(&format!("{name}.bias"), &[c])?))
    }

    fn resnet(&self, name: &str, cin: usize, cout: usize) -> Result<Resnet> {
        Ok(Resnet {
            norm1: self.norm(&format!("{name}.norm1"), cin)?,
            conv1: self.conv(&format!("{name}.conv1"), cout, cin, 3)?,
            norm2: self.norm(&format!("{name}.norm2"), cout)?,
            conv2: self.conv(&format!("{name}.conv2"), cout, cout, 3)?,
            shortcut: if cin != cout { Some(self.conv(&format!("{name}.conv_shortcut"), cout, cin, 1)?) } else { None },
        })
    }

    fn mid(&self, prefix: &str, c: usize, attention: bool) -> Result<Mid> {
        let attn = if attention {
            let p = format!("{prefix}.mid_block.attentions.0");
            Some(MidAttention {
                norm: self.norm(&format!("{p}.group_norm"), c)?,
                q: self.proj(&format!("{p}.to_q"), c)?,
                k: self.proj(&format!("{p}.to_k"), c)?,
                v: self.proj(&format!("{p}.to_v"), c)?,
                out: self.proj(&format!("{p}.to_out.0"), c)?,
            })
        } else {
            None
        };
        Ok(Mid {
            res0: self.resnet(&format!("{prefix}.mid_block.resnets.0"), c, c)?,
            attn,
            res1: self.resnet(&format!("{prefix}.mid_block.resnets.1"), c, c)?,
        })
    }
}

struct Conv {
    w: Tensor,
    b: Tensor,
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

struct Resnet {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

struct MidAttention {
    norm: Norm,
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    v: (Tensor, Tensor),
    out: (Tensor, Tensor),
}

struct Mid {
    res0: Resnet,
    attn: Option<MidAttention>,
    res1: Resnet,
}

struct Level {
    resnets: Vec<Resnet>,
    /// Downsampler (encoder) or upsampler (decoder) conv.
    resample: Option<Conv>,
}

struct Encoder {
    conv_in: Conv,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: Norm,
    conv_out: Conv,
    quant_conv: Option<Conv>,
}

struct Decoder {
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid: Mid,
    levels: Vec<Level>,
    norm_out: Norm,
    conv_out: Conv,
}

/// Which halves to load (decode-only runs skip the encoder).
#[derive(Debug, Clone, Copy)]
pub struct VaeParts {
    pub encoder: bool,
    pub decoder: bool,
}

pub struct Vae {
    be: Arc<dyn Backend>,
    cfg: VaeConfig,
    encoder: Option<Encoder>,
    decoder: Option<Decoder>,
    bn_mean: Vec<f32>,
    bn_var: Vec<f32>,
}

impl Vae {
    /// Load from a diffusers `vae/` folder or a BFL `ae.safetensors` file.
    pub fn load(be: Arc<dyn Backend>, path: &Path, parts: VaeParts) -> Result<Vae> {
        let (store, layout, cfg) = open(path)?;
        Vae::from_store(be, &store, layout, cfg, parts)
    }

    pub fn from_store(
        be: Arc<dyn Backend>,
        store: &WeightStore,
        layout: VaeLayout,
        cfg: VaeConfig,
        parts: VaeParts,
    ) -> Result<Vae> {
        cfg.validate().map_err(|r| Error::config(store.origin(), r))?;
        let levels = cfg.block_out_channels.len();
        let l = Loader { store, layout, levels, be: &*be };
        let zc = cfg.latent_channels;
        let encoder = if parts.encoder {
            let ch = &cfg.block_out_channels;
            let mut prev = ch[0];
            let lv = (0..levels)
                .map(|i| {
                    let resnets = (0..cfg.layers_per_block)
                        .map(|j| {
                            l.resnet(
                                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                                if j == 0 { prev } else { ch[i] },
                                ch[i],
                            )
                        })
                        .collect::<Result<Vec<_>>>()?;
                    prev = ch[i];
                    let resample = if i + 1 < levels {
                        Some(l.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), ch[i], ch[i], 3)?)
                    } else {
                        None
                    };
                    Ok(Level { resnets, resample })
                })
                .collect::<Result<Vec<_>>>()?;
            let top = ch[levels - 1];
            Some(Encoder {
                conv_in: l.conv("encoder.conv_in", ch[0], cfg.in_channels, 3)?,
                levels: lv,
                mid: l.mid("encoder", top, cfg.mid_block_add_attention)?,
                norm_out: l.norm("encoder.conv_norm_out", top)?,
                conv_out: l.conv("encoder.conv_out", 2 * zc, top, 3)?,
                quant_conv: if cfg.use_quant_conv { Some(l.conv("quant_conv", 2 * zc, 2 * zc, 1)?) } else { None },
            })
        } else {
            None
        };
        let decoder = if parts.decoder {
            let rev: Vec<usize> = cfg.decoder_channels().iter().rev().copied().collect();
            let mut prev = rev[0];
            let lv = (0..levels)
                .map(|k| {
                    let resnets = (0..cfg.layers_per_block + 1)
                        .map(|j| {
                            l.resnet(
                                &format!("decoder.up_blocks.{k}.resnets.{j}"),
                                if j == 0 { prev } else { rev[k] },
                                rev[k],
                            )
                        })
                        .collect::<Result<Vec<_>>>()?;
                    prev = rev[k];
                    let resample = if k + 1 < levels {
                        Some(l.conv(&format!("decoder.up_blocks.{k}.upsamplers.0.conv"), rev[k], rev[k], 3)?)
                    } else {
                        None
                    };
                    Ok(Level { resnets, resample })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Decoder {
                post_quant_conv: if cfg.use_post_quant_conv {
                    Some(l.conv("post_quant_conv", zc, zc, 1)?)
                } else {
                    None
                },
                conv_in: l.conv("decoder.conv_in", rev[0], zc, 3)?,
                mid: l.mid("decoder", rev[0], cfg.mid_block_add_attention)?,
                levels: lv,
                norm_out: l.norm("decoder.conv_norm_out", rev[levels - 1])?,
                conv_out: l.conv("decoder.conv_out", cfg.out_channels, rev[levels - 1], 3)?,
            })
        } else {
            None
        };
        let stats = |name: &str| -> Result<Vec<f32>> { store.get_shaped(name, &[cfg.packed_channels()])?.to_f32() };
        Ok(Vae { bn_mean: stats("bn.running_mean")?, bn_var: stats("bn.running_var")?, encoder, decoder, cfg, be })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    fn conv(&self, x: &Tensor, c: &Conv, stride: usize, pad: Padding2d) -> Result<Tensor> {
        self.be.conv2d(x, &c.w, Some(&c.b), stride, pad)
    }

    fn resnet(&self, x: &Tensor, r: &Resnet) -> Result<Tensor> {
        let be = &*self.be;
        let g = self.cfg.norm_num_groups;
        let h = be.group_norm(x, g, &r.norm1.w, &r.norm1.b, RESNET_EPS, true)?;
        let h = self.conv(&h, &r.conv1, 1, Padding2d::same(1))?;
        let h = be.group_norm(&h, g, &r.norm2.w, &r.norm2.b, RESNET_EPS, true)?;
        let h = self.conv(&h, &r.conv2, 1, Padding2d::same(1))?;
        let shortcut = match &r.shortcut {
            Some(c) => self.conv(x, c, 1, Padding2d::same(0))?,
            None => x.clone(),
        };
        be.axpby(1.0, &shortcut, 1.0, &h)
    }

    /// Single-head self-attention over the H·W positions, with a residual.
    fn mid_attention(&self, x: &Tensor, a: &MidAttention) -> Result<Tensor> {
        let be = &*self.be;
        let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let hn = be.group_norm(x, self.cfg.norm_num_groups, &a.norm.w, &a.norm.b, RESNET_EPS, false)?;
        let tokens = be.contiguous(&hn.reshape(&[b, c, h * w])?.permute(&[0, 2, 1])?)?;
        let proj = |p: &(Tensor, Tensor)| -> Result<Tensor> {
            be.linear(&tokens, &p.0, Some(&p.1))?.reshape(&[b, h * w, 1, c])
        };
        let o = be.attention(&proj(&a.q)?, &proj(&a.k)?, &proj(&a.v)?, &AttnMask::None, 1.0 / (c as f32).sqrt())?;
        let o = be.linear(&o.reshape(&[b, h * w, c])?, &a.out.0, Some(&a.out.1))?;
        let o = be.contiguous(&o.permute(&[0, 2, 1])?)?.reshape(&[b, c, h, w])?;
        be.axpby(1.0, x, 1.0, &o)
    }

    fn mid(&self, x: &Tensor, m: &Mid) -> Result<Tensor> {
        let mut h = self.resnet(x, &m.res0)?;
        if let Some(a) = &m.attn {
            h = self.mid_attention(&h, a)?;
        }
        self.resnet(&h, &m.res1)
    }

    /// Image `[B, C, H, W]` in [-1, 1] -> the latent distribution's mode `[B, z, H/f, W/f]`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let enc =
            self.encoder.as_ref().ok_or_else(|| Error::InvalidArgument("the VAE encoder was not loaded".into()))?;
        if x.rank() != 4 || x.dim(1) != self.cfg.in_channels {
            return Err(Error::shape(
                "vae encode",
                format!("expected [B, {}, H, W], got {:?}", self.cfg.in_channels, x.shape()),
            ));
        }
        let be = &*self.be;
        let _scope = crate::backend::scope::enter(|| "vae.encoder".into());
        let mut h = self.conv(x, &enc.conv_in, 1, Padding2d::same(1))?;
        for (i, level) in enc.levels.iter().enumerate() {
            let _level = crate::backend::scope::enter(|| format!("down_blocks.{i}"));
            for r in &level.resnets {
                h = self.resnet(&h, r)?;
            }
            if let Some(down) = &level.resample {
                h = self.conv(&h, down, 2, Padding2d { top: 0, bottom: 1, left: 0, right: 1 })?;
            }
        }
        h = self.mid(&h, &enc.mid)?;
        h = be.group_norm(&h, self.cfg.norm_num_groups, &enc.norm_out.w, &enc.norm_out.b, RESNET_EPS, true)?;
        h = self.conv(&h, &enc.conv_out, 1, Padding2d::same(1))?;
        if let Some(q) = &enc.quant_conv {
            h = self.conv(&h, q, 1, Padding2d::same(0))?;
        }
        be.contiguous(&h.narrow(1, 0, self.cfg.latent_channels)?)
    }

    /// Latent `[B, z, h, w]` -> image `[B, C, h·f, w·f]` in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let dec =
            self.decoder.as_ref().ok_or_else(|| Error::InvalidArgument("the VAE decoder was not loaded".into()))?;
        if z.rank() != 4 || z.dim(1) != self.cfg.latent_channels {
            return Err(Error::shape(
                "vae decode",
                format!("expected [B, {}, h, w], got {:?}", self.cfg.latent_channels, z.shape()),
            ));
        }
        let be = &*self.be;
        let _scope = crate::backend::scope::enter(|| "vae.decoder".into());
        let mut h = match &dec.post_quant_conv {
            Some(c) => self.conv(z, c, 1, Padding2d::same(0))?,
            None => z.clone(),
        };
        h = self.conv(&h, &dec.conv_in, 1, Padding2d::same(1))?;
        h = self.mid(&h, &dec.mid)?;
        for (i, level) in dec.levels.iter().enumerate() {
            let _level = crate::backend::scope::enter(|| format!("up_blocks.{i}"));
            for r in &level.resnets {
                h = self.resnet(&h, r)?;
            }
            if let Some(up) = &level.resample {
                h = self.conv(&be.upsample_nearest2x(&h)?, up, 1, Padding2d::same(1))?;
            }
        }
        h = be.group_norm(&h, self.cfg.norm_num_groups, &dec.norm_out.w, &dec.norm_out.b, RESNET_EPS, true)?;
        self.conv(&h, &dec.conv_out, 1, Padding2d::same(1))
    }

    fn bn_tensors(&self, inverse: bool) -> Result<(Tensor, Tensor)> {
        let eps = self.cfg.batch_norm_eps as f32;
        let std: Vec<f32> = self.bn_var.iter().map(|v| (v + eps).sqrt()).collect();
        let (mul, add): (Vec<f32>, Vec<f32>) = if inverse {
            (std.clone(), self.bn_mean.clone())
        } else {
            std.iter().zip(&self.bn_mean).map(|(s, m)| (1.0 / s, -m / s)).unzip()
        };
        let n = mul.len();
        Ok((
            self.be.upload(&Tensor::from_f32(mul, &[n])?, DType::F32)?,
            self.be.upload(&Tensor::from_f32(add, &[n])?, DType::F32)?,
        ))
    }

    /// Patchified latent -> the transformer's normalised space: `(x - mean) / sqrt(var + eps)`.
    pub fn normalize(&self, zp: &Tensor) -> Result<Tensor> {
        let (mul, add) = self.bn_tensors(false)?;
        self.be.channel_affine(zp, &mul, &add)
    }

    /// The inverse: `x · sqrt(var + eps) + mean`.
    pub fn denormalize(&self, x: &Tensor) -> Result<Tensor> {
        let (mul, add) = self.bn_tensors(true)?;
        self.be.channel_affine(x, &mul, &add)
    }

    /// Image -> normalised, patchified latents `[B, 4z, H/2f, W/2f]` (the pipeline's
    /// `_encode_vae_image`).
    pub fn encode_normalized(&self, x: &Tensor) -> Result<Tensor> {
        self.normalize(&patchify(&*self.be, &self.encode(x)?)?)
    }

    /// Normalised, patchified latents -> image (the end of the pipeline's `__call__`), in tiles
    /// of `tile` pixels when given.
    pub fn decode_normalized(&self, x: &Tensor) -> Result<Tensor> {
        self.decode_normalized_tiled(x, None)
    }

    pub fn decode_normalized_tiled(&self, x: &Tensor, tile: Option<usize>) -> Result<Tensor> {
        let z = unpatchify(&*self.be, &self.denormalize(x)?)?;
        match tile {
            Some(t) => self.decode_tiled(&z, t),
            None => self.decode(&z),
        }
    }
}

/// 2×2 space-to-depth: `[B, C, H, W] -> [B, 4C, H/2, W/2]`, channel `c·4 + 2·pi + pj`.
pub fn patchify(be: &dyn Backend, z: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = (z.dim(0), z.dim(1), z.dim(2), z.dim(3));
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::shape("patchify", format!("latent {:?} has an odd side", z.shape())));
    }
    let v = be.contiguous(z)?.reshape(&[b, c, h / 2, 2, w / 2, 2])?.permute(&[0, 1, 3, 5, 2, 4])?;
    be.contiguous(&v)?.reshape(&[b, c * 4, h / 2, w / 2])
}

/// Inverse of [`patchify`].
pub fn unpatchify(be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
    let (b, c4, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    if c4 % 4 != 0 {
        return Err(Error::shape("unpatchify", format!("{c4} channels are not a multiple of 4")));
    }
    let v = be.contiguous(x)?.reshape(&[b, c4 / 4, 2, 2, h, w])?.permute(&[0, 1, 4, 2, 5, 3])?;
    be.contiguous(&v)?.reshape(&[b, c4 / 4, h * 2, w * 2])
}

/// `[B, C, h, w] -> [B, h·w, C]` tokens in row-major order.
pub fn pack(be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    be.contiguous(&be.contiguous(x)?.reshape(&[b, c, h * w])?.permute(&[0, 2, 1])?)
}

/// `[B, h·w, C] -> [B, C, h, w]`.
pub fn unpack(be: &dyn Backend, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, l, c) = (x.dim(0), x.dim(1), x.dim(2));
    if l != h * w {
        return Err(Error::shape("unpack", format!("{l} tokens do not form a {h}x{w} grid")));
    }
    be.contiguous(&be.contiguous(x)?.permute(&[0, 2, 1])?)?.reshape(&[b, c, h, w])
}

/// Every tensor of the diffusers layout (without BatchNorm's integer `num_batches_tracked`).
pub fn tensors(cfg: &VaeConfig) -> Vec<crate::weights::TensorSpec> {
    use crate::weights::TensorSpec;
    let mut v = Vec::new();
    let conv = |v: &mut Vec<TensorSpec>, name: &str, cout: usize, cin: usize, k: usize| {
        v.push(TensorSpec::new(format!("{name}.weight"), &[cout, cin, k, k]));
        v.push(TensorSpec::new(format!("{name}.bias"), &[cout]));
    };
    let norm = |v: &mut Vec<TensorSpec>, name: &str, c: usize| {
        v.push(TensorSpec::new(format!("{name}.weight"), &[c]));
        v.push(TensorSpec::new(format!("{name}.bias"), &[c]));
    };
    let resnet = |v: &mut Vec<TensorSpec>, name: &str, cin: usize, cout: usize| {
        norm(v, &format!("{name}.norm1"), cin);
        conv(v, &format!("{name}.conv1"), cout, cin, 3);
        norm(v, &format!("{name}.norm2"), cout);
        conv(v, &format!("{name}.conv2"), cout, cout, 3);
        if cin != cout {
            conv(v, &format!("{name}.conv_shortcut"), cout, cin, 1);
        }
    };
    let mid = |v: &mut Vec<TensorSpec>, prefix: &str, c: usize| {
        resnet(v, &format!("{prefix}.mid_block.resnets.0"), c, c);
        if cfg.mid_block_add_attention {
            let p = format!("{prefix}.mid_block.attentions.0");
            norm(v, &format!("{p}.group_norm"), c);
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                v.push(TensorSpec::new(format!("{p}.{proj}.weight"), &[c, c]));
                v.push(TensorSpec::new(format!("{p}.{proj}.bias"), &[c]));
            }
        }
        resnet(v, &format!("{prefix}.mid_block.resnets.1"), c, c);
    };
    let (ch, z, levels) = (&cfg.block_out_channels, cfg.latent_channels, cfg.block_out_channels.len());
    conv(&mut v, "encoder.conv_in", ch[0], cfg.in_channels, 3);
    let mut prev = ch[0];
    for i in 0..levels {
        for j in 0..cfg.layers_per_block {
            resnet(&mut v, &format!("encoder.down_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { ch[i] }, ch[i]);
        }
        prev = ch[i];
        if i + 1 < levels {
            conv(&mut v, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"), ch[i], ch[i], 3);
        }
    }
    mid(&mut v, "encoder", ch[levels - 1]);
    norm(&mut v, "encoder.conv_norm_out", ch[levels - 1]);
    conv(&mut v, "encoder.conv_out", 2 * z, ch[levels - 1], 3);
    if cfg.use_quant_conv {
        conv(&mut v, "quant_conv", 2 * z, 2 * z, 1);
    }
    if cfg.use_post_quant_conv {
        conv(&mut v, "post_quant_conv", z, z, 1);
    }
    let rev: Vec<usize> = cfg.decoder_channels().iter().rev().copied().collect();
    conv(&mut v, "decoder.conv_in", rev[0], z, 3);
    mid(&mut v, "decoder", rev[0]);
    let mut prev = rev[0];
    for k in 0..levels {
        for j in 0..cfg.layers_per_block + 1 {
            resnet(&mut v, &format!("decoder.up_blocks.{k}.resnets.{j}"), if j == 0 { prev } else { rev[k] }, rev[k]);
        }
        prev = rev[k];
        if k + 1 < levels {
            conv(&mut v, &format!("decoder.up_blocks.{k}.upsamplers.0.conv"), rev[k], rev[k], 3);
        }
    }
    norm(&mut v, "decoder.conv_norm_out", rev[levels - 1]);
    conv(&mut v, "decoder.conv_out", cfg.out_channels, rev[levels - 1], 3);
    v.push(TensorSpec::new("bn.running_mean", &[cfg.packed_channels()]));
    v.push(TensorSpec::new("bn.running_var", &[cfg.packed_channels()]));
    v
}

impl Vae {
    /// Decode in overlapping tiles of `tile` pixels (overlap a quarter of a tile, linearly
    /// feathered), so peak activations scale with the tile instead of the image. The mid-block
    /// attention then sees one tile at a time, so results differ slightly from one-piece decoding
    /// (as diffusers' tiled decode does); the memory plan only asks for it when one piece does
    /// not fit.
    pub fn decode_tiled(&self, z: &Tensor, tile: usize) -> Result<Tensor> {
        if z.rank() == 4 && z.dim(0) > 1 {
            let parts =
                (0..z.dim(0)).map(|b| self.decode_tiled(&z.narrow(0, b, 1)?, tile)).collect::<Result<Vec<_>>>()?;
            return self.be.concat(&parts.iter().collect::<Vec<_>>(), 0);
        }
        if z.rank() != 4 || z.dim(1) != self.cfg.latent_channels {
            return Err(Error::shape(
                "vae decode",
                format!("expected [B, {}, h, w], got {:?}", self.cfg.latent_channels, z.shape()),
            ));
        }
        let f = self.cfg.scale_factor();
        let (h, w) = (z.dim(2), z.dim(3));
        let t = (tile / f).max(2);
        if t >= h && t >= w {
            return self.decode(z);
        }
        let overlap = (t / 4).max(1);
        let stride = t - overlap;
        let starts = |n: usize| -> Vec<usize> {
            let mut v: Vec<usize> = (0..).map(|i| i * stride).take_while(|&s| s + t < n).collect();
            v.push(n.saturating_sub(t));
            v.dedup();
            v
        };
        let (oh, ow, c) = (h * f, w * f, self.cfg.out_channels);
        let mut acc = vec![0f32; c * oh * ow];
        let mut weight = vec![0f32; oh * ow];
        let ramp = (overlap * f) as f32;
        for &y0 in &starts(h) {
            for &x0 in &starts(w) {
                let (th, tw) = (t.min(h), t.min(w));
                let piece = self.be.contiguous(&z.narrow(2, y0, th)?.narrow(3, x0, tw)?)?;
                let img = self.decode(&piece)?.to_vec_f32()?;
                let (ph, pw) = (th * f, tw * f);
                for py in 0..ph {
                    // Feather only edges that border another tile.
                    let wy = feather(py, ph, ramp, y0 > 0, y0 + th < h);
                    for px in 0..pw {
                        let wgt = wy * feather(px, pw, ramp, x0 > 0, x0 + tw < w);
                        let o = (y0 * f + py) * ow + x0 * f + px;
                        weight[o] += wgt;
                        for ch in 0..c {
                            acc[ch * oh * ow + o] += wgt * img[(ch * ph + py) * pw + px];
                        }
                    }
                }
            }
        }
        for ch in 0..c {
            for (a, wgt) in acc[ch * oh * ow..(ch + 1) * oh * ow].iter_mut().zip(&weight) {
                *a /= wgt.max(1e-12);
            }
        }
        let host = Tensor::from_f32(acc, &[1, c, oh, ow])?;
        self.be.upload(&host, self.be.activation_dtype())
    }
}

/// Blend weight of position `i` of `n` with linear ramps of `ramp` pixels on the shared edges.
fn feather(i: usize, n: usize, ramp: f32, low_edge: bool, high_edge: bool) -> f32 {
    let mut w = 1.0f32;
    if low_edge {
        w = w.min((i as f32 + 0.5) / ramp);
    }
    if high_edge {
        w = w.min(((n - i) as f32 - 0.5) / ramp);
    }
    w.clamp(1e-3, 1.0)
}
