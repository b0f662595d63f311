//! Tensor names and shapes of the FLUX.2 transformer in both checkpoint layouts (spec §8.1):
//! diffusers (`Flux2Transformer2DModel`) and BFL's original single file. One table describes how
//! every BFL tensor is built from rows of diffusers tensors; loading and `synth` both use it.

use std::ops::Range;

use super::config::TransformerConfig;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::quant::{QuantFormat, Quantized};
use crate::tensor::Tensor;
use crate::weights::{Encoding, TensorSpec, WeightStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Diffusers,
    Bfl,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Diffusers => "diffusers",
            Layout::Bfl => "bfl",
        }
    }

    /// Detect the layout of a transformer checkpoint; BFL files may carry ComfyUI's
    /// `model.diffusion_model.` prefix, which is then set on the store.
    pub fn detect(store: &mut WeightStore) -> Result<Layout> {
        if store.contains("x_embedder.weight") {
            return Ok(Layout::Diffusers);
        }
        if store.contains("img_in.weight") {
            return Ok(Layout::Bfl);
        }
        for prefix in ["model.diffusion_model.", "diffusion_model.", "transformer."] {
            store.set_prefix(prefix);
            if store.contains("img_in.weight") {
                return Ok(Layout::Bfl);
            }
            if store.contains("x_embedder.weight") {
                return Ok(Layout::Diffusers);
            }
        }
        store.set_prefix("");
        Err(Error::config(
            store.origin(),
            "not a FLUX.2 transformer checkpoint: neither `x_embedder.weight` (diffusers) nor `img_in.weight` (BFL) is present",
        ))
    }
}

/// `rows` of diffusers tensor `name`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSlice {
    pub name: String,
    pub rows: Range<usize>,
}

fn spec(name: String, shape: &[usize]) -> TensorSpec {
    TensorSpec::new(name, shape)
}

/// Every tensor of the diffusers layout, in a stable order.
pub fn diffusers_tensors(cfg: &TransformerConfig) -> Vec<TensorSpec> {
    let (d, m, hd) = (cfg.hidden(), cfg.mlp_hidden(), cfg.attention_head_dim);
    let mut v = vec![
        spec("time_guidance_embed.timestep_embedder.linear_1.weight".into(), &[d, cfg.timestep_guidance_channels]),
        spec("time_guidance_embed.timestep_embedder.linear_2.weight".into(), &[d, d]),
    ];
    if cfg.guidance_embeds {
        v.push(spec(
            "time_guidance_embed.guidance_embedder.linear_1.weight".into(),
            &[d, cfg.timestep_guidance_channels],
        ));
        v.push(spec("time_guidance_embed.guidance_embedder.linear_2.weight".into(), &[d, d]));
    }
    v.push(spec("double_stream_modulation_img.linear.weight".into(), &[6 * d, d]));
    v.push(spec("double_stream_modulation_txt.linear.weight".into(), &[6 * d, d]));
    v.push(spec("single_stream_modulation.linear.weight".into(), &[3 * d, d]));
    v.push(spec("x_embedder.weight".into(), &[d, cfg.in_channels]));
    v.push(spec("context_embedder.weight".into(), &[d, cfg.joint_attention_dim]));
    for i in 0..cfg.num_layers {
        let p = format!("transformer_blocks.{i}");
        for name in ["to_q", "to_k", "to_v"] {
            v.push(spec(format!("{p}.attn.{name}.weight"), &[d, d]));
        }
        v.push(spec(format!("{p}.attn.norm_q.weight"), &[hd]));
        v.push(spec(format!("{p}.attn.norm_k.weight"), &[hd]));
        v.push(spec(format!("{p}.attn.to_out.0.weight"), &[d, d]));
        for name in ["add_q_proj", "add_k_proj", "add_v_proj"] {
            v.push(spec(format!("{p}.attn.{name}.weight"), &[d, d]));
        }
        v.push(spec(format!("{p}.attn.norm_added_q.weight"), &[hd]));
        v.push(spec(format!("{p}.attn.norm_added_k.weight"), &[hd]));
        v.push(spec(format!("{p}.attn.to_add_out.weight"), &[d, d]));
        for ff in ["ff", "ff_context"] {
            v.push(spec(format!("{p}.{ff}.linear_in.weight"), &[2 * m, d]));
            v.push(spec(format!("{p}.{ff}.linear_out.weight"), &[d, m]));
        }
    }
    for i in 0..cfg.num_single_layers {
        let p = format!("single_transformer_blocks.{i}.attn");
        v.push(spec(format!("{p}.to_qkv_mlp_proj.weight"), &[3 * d + 2 * m, d]));
        v.push(spec(format!("{p}.norm_q.weight"), &[hd]));
        v.push(spec(format!("{p}.norm_k.weight"), &[hd]));
        v.push(spec(format!("{p}.to_out.weight"), &[d, d + m]));
    }
    v.push(spec("norm_out.linear.weight".into(), &[2 * d, d]));
    v.push(spec("proj_out.weight".into(), &[cfg.out_features(), d]));
    v
}

/// Every tensor of the BFL layout with the diffusers rows it is made of (in order).
pub fn bfl_tensors(cfg: &TransformerConfig) -> Vec<(TensorSpec, Vec<RowSlice>)> {
    let d = cfg.hidden();
    let whole = |bfl: String, diffusers: String, shape: &[usize]| {
        (spec(bfl, shape), vec![RowSlice { name: diffusers, rows: 0..shape[0] }])
    };
    let mut out = Vec::new();
    for t in diffusers_tensors(cfg) {
        let n = &t.name;
        let s = &t.shape;
        let renamed = |from: &str, to: &str| n.replacen(from, to, 1);
        if let Some(rest) = n.strip_prefix("transformer_blocks.") {
            let (i, field) = rest.split_once('.').unwrap();
            let p = format!("double_blocks.{i}");
            let simple = match field {
                "attn.norm_q.weight" => Some("img_attn.norm.query_norm.scale"),
                "attn.norm_k.weight" => Some("img_attn.norm.key_norm.scale"),
                "attn.to_out.0.weight" => Some("img_attn.proj.weight"),
                "attn.norm_added_q.weight" => Some("txt_attn.norm.query_norm.scale"),
                "attn.norm_added_k.weight" => Some("txt_attn.norm.key_norm.scale"),
                "attn.to_add_out.weight" => Some("txt_attn.proj.weight"),
                "ff.linear_in.weight" => Some("img_mlp.0.weight"),
                "ff.linear_out.weight" => Some("img_mlp.2.weight"),
                "ff_context.linear_in.weight" => Some("txt_mlp.0.weight"),
                "ff_context.linear_out.weight" => Some("txt_mlp.2.weight"),
                _ => None,
            };
            if let Some(b) = simple {
                out.push(whole(format!("{p}.{b}"), n.clone(), s));
            } else if field == "attn.to_q.weight" || field == "attn.add_q_proj.weight" {
                // Fused qkv: rows [0:D] = q, [D:2D] = k, [2D:3D] = v.
                let (stream, names) = if field == "attn.to_q.weight" {
                    ("img", ["to_q", "to_k", "to_v"])
                } else {
                    ("txt", ["add_q_proj", "add_k_proj", "add_v_proj"])
                };
                let parts = names
                    .iter()
                    .map(|nm| RowSlice { name: format!("transformer_blocks.{i}.attn.{nm}.weight"), rows: 0..d })
                    .collect();
                out.push((spec(format!("{p}.{stream}_attn.qkv.weight"), &[3 * d, d]), parts));
            }
            // to_k/to_v/add_k/add_v are covered by the fused qkv entries above.
        } else if let Some(rest) = n.strip_prefix("single_transformer_blocks.") {
            let (i, field) = rest.split_once('.').unwrap();
            let b = match field {
                "attn.to_qkv_mlp_proj.weight" => "linear1.weight",
                "attn.to_out.weight" => "linear2.weight",
                "attn.norm_q.weight" => "norm.query_norm.scale",
                _ => "norm.key_norm.scale",
            };
            out.push(whole(format!("single_blocks.{i}.{b}"), n.clone(), s));
        } else if n == "norm_out.linear.weight" {
            // BFL stores (shift, scale); diffusers (scale, shift).
            let parts = vec![RowSlice { name: n.clone(), rows: d..2 * d }, RowSlice { name: n.clone(), rows: 0..d }];
            out.push((spec("final_layer.adaLN_modulation.1.weight".into(), s), parts));
        } else {
            let b = if n == "proj_out.weight" {
                "final_layer.linear.weight".to_string()
            } else {
                renamed("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer")
                    .replacen("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer", 1)
                    .replacen("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer", 1)
                    .replacen("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer", 1)
                    .replacen("modulation_img.linear", "modulation_img.lin", 1)
                    .replacen("modulation_txt.linear", "modulation_txt.lin", 1)
                    .replacen("single_stream_modulation.linear", "single_stream_modulation.lin", 1)
                    .replacen("x_embedder", "img_in", 1)
                    .replacen("context_embedder", "txt_in", 1)
            };
            out.push(whole(b, n.clone(), s));
        }
    }
    out
}

/// A piece of a stored tensor: `rows` of checkpoint tensor `key`.
#[derive(Debug, Clone, PartialEq)]
struct StoredRows {
    key: String,
    rows: Range<usize>,
}

/// Loads diffusers-named tensors from either layout.
pub struct TransformerWeights {
    pub store: std::sync::Arc<WeightStore>,
    pub layout: Layout,
    /// For the BFL layout: stored key -> full shape.
    bfl_shapes: std::collections::HashMap<String, Vec<usize>>,
    /// For the BFL layout: diffusers name -> pieces, ordered by diffusers row.
    bfl_map: std::collections::HashMap<String, Vec<(Range<usize>, StoredRows)>>,
    /// LoRAs merged into every weight this loads (`crate::lora`).
    adapters: Option<std::sync::Arc<crate::lora::AdapterSet>>,
}

impl TransformerWeights {
    pub fn new(store: std::sync::Arc<WeightStore>, layout: Layout, cfg: &TransformerConfig) -> Self {
        let mut bfl_map: std::collections::HashMap<String, Vec<(Range<usize>, StoredRows)>> = Default::default();
        let mut bfl_shapes = std::collections::HashMap::new();
        if layout == Layout::Bfl {
            for (t, parts) in bfl_tensors(cfg) {
                bfl_shapes.insert(t.name.clone(), t.shape.clone());
                let mut at = 0;
                for p in parts {
                    let len = p.rows.len();
                    bfl_map
                        .entry(p.name)
                        .or_default()
                        .push((p.rows, StoredRows { key: t.name.clone(), rows: at..at + len }));
                    at += len;
                }
            }
            for pieces in bfl_map.values_mut() {
                pieces.sort_by_key(|(r, _)| r.start);
            }
        }
        TransformerWeights { store, layout, bfl_shapes, bfl_map, adapters: None }
    }

    /// Merge these adapters into every weight loaded from now on.
    pub fn with_adapters(mut self, adapters: Option<std::sync::Arc<crate::lora::AdapterSet>>) -> Self {
        self.adapters = adapters;
        self
    }

    /// The adapters merged into what this loads.
    pub fn adapters(&self) -> Option<&std::sync::Arc<crate::lora::AdapterSet>> {
        self.adapters.as_ref()
    }

    /// Whether adapters are merged into what this loads.
    pub fn has_adapters(&self) -> bool {
        self.adapters.is_some()
    }

    /// The merged adapters, if any touch one of `names`.
    pub fn adapters_for(&self, names: &[&str]) -> Option<&crate::lora::AdapterSet> {
        self.adapters.as_deref().filter(|a| a.touches(names))
    }

    /// Stored pieces that make up diffusers tensor `name` (rows in order).
    fn pieces(&self, name: &str, shape: &[usize]) -> Vec<StoredRows> {
        match self.layout {
            Layout::Diffusers => vec![StoredRows { key: name.to_string(), rows: 0..shape[0] }],
            Layout::Bfl => {
                self.bfl_map.get(name).map(|v| v.iter().map(|(_, s)| s.clone()).collect()).unwrap_or_default()
            }
        }
    }

    /// The stored pieces making up the row-wise concatenation of diffusers tensors `names` (each
    /// of `shape`), consecutive rows of one stored tensor merged.
    fn pieces_of(&self, names: &[&str], shape: &[usize]) -> Result<Vec<StoredRows>> {
        let mut merged: Vec<StoredRows> = Vec::new();
        for name in names {
            let p = self.pieces(name, shape);
            if p.is_empty() {
                return Err(Error::MissingKey { path: self.store.origin().to_path_buf(), key: name.to_string() });
            }
            for piece in p {
                match merged.last_mut() {
                    Some(last) if last.key == piece.key && last.rows.end == piece.rows.start => {
                        last.rows.end = piece.rows.end
                    }
                    _ => merged.push(piece),
                }
            }
        }
        Ok(merged)
    }

    /// Load the row-wise concatenation of diffusers tensors `names` (each of `shape`) onto the
    /// device in the stored dtype; slices of one stored tensor load without a copy.
    pub fn load_concat(&self, be: &dyn Backend, names: &[&str], shape: &[usize]) -> Result<Tensor> {
        let _scope = crate::backend::scope::enter(|| format!("transformer weight `{}`", names.join("` + `")));
        if let Some(adapters) = self.adapters_for(names) {
            return self.load_merged(be, adapters, names, shape);
        }
        let tensors = self
            .pieces_of(names, shape)?
            .iter()
            .map(|p| self.load_rows(be, p, &shape[1..]))
            .collect::<Result<Vec<_>>>()?;
        if tensors.len() == 1 {
            return Ok(tensors.into_iter().next().unwrap());
        }
        be.concat(&tensors.iter().collect::<Vec<_>>(), 0)
    }

    pub fn load(&self, be: &dyn Backend, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.load_concat(be, &[name], shape)
    }

    /// The same concatenation as host f32 values (for quantizing at load).
    pub fn host_concat(&self, names: &[&str], shape: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in self.pieces_of(names, shape)? {
            out.extend(self.rows_f32(&p, &shape[1..])?);
        }
        if let Some(adapters) = self.adapters_for(names) {
            crate::lora::merge::merge_into(adapters, names, shape[0], shape[1..].iter().product(), &mut out);
        }
        Ok(out)
    }

    /// The same concatenation in the engine's FP8 format: the stored codes of an FP8 checkpoint
    /// (`stored_fp8`), else quantized, rows decoded and quantized in parallel straight from the
    /// file; with a LoRA merged in, from `host_concat`'s values, recording what requantizing cost.
    pub fn fp8_concat(&self, names: &[&str], shape: &[usize]) -> Result<Quantized> {
        if let Some(q) = self.stored_fp8(names, shape)? {
            return Ok(q);
        }
        let cols = shape[1..].iter().product();
        let Some(adapters) = self.adapters_for(names) else {
            let pieces = self
                .pieces_of(names, shape)?
                .into_iter()
                .map(|p| Ok((self.stored(&p, &shape[1..])?, p.rows)))
                .collect::<Result<Vec<_>>>()?;
            return crate::model::linear::quantize_pieces(&pieces, cols, QuantFormat::Fp8);
        };
        let values = self.host_concat(names, shape)?;
        let q = crate::quant::quantize(&values, shape[0] * names.len(), cols, QuantFormat::Fp8)?;
        adapters.record_merge(&values, &crate::quant::dequantize(&q), || format!("{} as fp8", names.join(" + ")));
        Ok(q)
    }

    /// The GGML blocks of a concatenation whose pieces are all stored in one GGML block type (a
    /// GGUF transformer), for the weight-only GEMM; None when any piece is stored otherwise or a
    /// LoRA is merged into it.
    pub fn stored_blocks(&self, names: &[&str], shape: &[usize]) -> Result<Option<Quantized>> {
        if self.adapters_for(names).is_some() {
            return Ok(None);
        }
        let pieces = self.pieces_of(names, shape)?;
        crate::model::linear::ggml_blocks(pieces.iter().map(|p| Ok((self.stored(p, &shape[1..])?, p.rows.clone()))))
    }

    /// Bytes of diffusers tensor `name` if every piece of it is stored as GGML blocks (what the
    /// device holds for it, see `stored_blocks`), without reading the data; None otherwise.
    pub fn stored_block_size(&self, name: &str, shape: &[usize]) -> Result<Option<usize>> {
        if shape.len() != 2 {
            return Ok(None);
        }
        let mut bytes = 0;
        for p in self.pieces_of(&[name], shape)? {
            let t = self.stored(&p, &shape[1..])?;
            match (&t.encoding, t.encoding.row_bytes(shape[1])) {
                (Encoding::Ggml(ty), Some(rb)) if ty.is_quantized() => bytes += p.rows.len() * rb,
                _ => return Ok(None),
            }
        }
        Ok(Some(bytes))
    }

    /// Bytes of diffusers tensor `name` as a backend that keeps FP8 codes holds it (codes and f32
    /// row scales, see `stored_scaled_fp8`) if its pieces are e4m3 and at least one has a scale,
    /// without reading the data; None otherwise.
    pub fn stored_scaled_fp8_size(&self, name: &str, shape: &[usize]) -> Result<Option<usize>> {
        if shape.len() != 2 || self.adapters_for(&[name]).is_some() {
            return Ok(None);
        }
        let mut scaled = false;
        for p in self.pieces_of(&[name], shape)? {
            match crate::model::linear::e4m3_scales(&self.stored(&p, &shape[1..])?.encoding) {
                Some(scales) => scaled |= scales.is_some(),
                None => return Ok(None),
            }
        }
        Ok(scaled.then_some(shape[0] * shape[1] + shape[0] * 4))
    }

    /// A weight with LoRAs merged: in f32 on the host, then stored as the checkpoint stores it
    /// (a quantized checkpoint tensor in the backend's activation dtype, as `load_rows` does).
    fn load_merged(
        &self,
        be: &dyn Backend,
        adapters: &crate::lora::AdapterSet,
        names: &[&str],
        shape: &[usize],
    ) -> Result<Tensor> {
        let first = self.pieces_of(names, shape)?.remove(0);
        let stored = self.stored(&first, &shape[1..])?;
        let dtype = if stored.is_dense() { stored.dtype()? } else { be.decoded_weight_dtype() };
        let mut values = self.host_concat(names, shape)?;
        adapters.round_merged(&mut values, dtype, names);
        let full = [&[shape[0] * names.len()][..], &shape[1..]].concat();
        be.load_weight(&crate::dtype::encode_from_f32(&values, dtype), dtype, &full)
    }

    /// The FP8 codes and per-row scales of a concatenation whose pieces are all stored as e4m3
    /// with a scale (the official -fp8 releases, ComfyUI float8 layers) or as plain e4m3: the
    /// engine's FP8 format is exactly that, so they are used as stored instead of requantized.
    /// None when any piece is stored otherwise.
    pub fn stored_fp8(&self, names: &[&str], shape: &[usize]) -> Result<Option<Quantized>> {
        Ok(self.fp8_codes(names, shape)?.map(|(q, _)| q))
    }

    /// `stored_fp8`, only when at least one piece carries a scale: the weights that would
    /// otherwise be decoded at load (plain e4m3 ones are kept in the memory map as they are).
    pub fn stored_scaled_fp8(&self, names: &[&str], shape: &[usize]) -> Result<Option<Quantized>> {
        Ok(self.fp8_codes(names, shape)?.and_then(|(q, scaled)| scaled.then_some(q)))
    }

    /// `stored_fp8`'s codes and scales, and whether any piece had a scale.
    fn fp8_codes(&self, names: &[&str], shape: &[usize]) -> Result<Option<(Quantized, bool)>> {
        if self.adapters_for(names).is_some() {
            return Ok(None);
        }
        let pieces = self.pieces_of(names, shape)?;
        crate::model::linear::fp8_codes(pieces.iter().map(|p| Ok((self.stored(p, &shape[1..])?, p.rows.clone()))))
    }

    /// The stored tensor a piece comes from, shape-checked.
    fn stored(&self, p: &StoredRows, row_shape: &[usize]) -> Result<crate::weights::RawTensor<'_>> {
        let stored_shape = match self.layout {
            // Diffusers pieces are whole tensors.
            Layout::Diffusers => [&[p.rows.end][..], row_shape].concat(),
            Layout::Bfl => self.bfl_shapes[&p.key].clone(),
        };
        self.store.get_shaped(&p.key, &stored_shape)
    }

    /// A piece's values in f32, decoded from whatever the checkpoint stores (plain, fp8 with a
    /// scale, GGUF blocks, ComfyUI's quantized layers).
    fn rows_f32(&self, p: &StoredRows, row_shape: &[usize]) -> Result<Vec<f32>> {
        self.stored(p, row_shape)?.rows_f32(p.rows.clone())
    }

    fn load_rows(&self, be: &dyn Backend, p: &StoredRows, row_shape: &[usize]) -> Result<Tensor> {
        let shape = [&[p.rows.len()][..], row_shape].concat();
        let t = self.stored(p, row_shape)?;
        if t.is_dense() {
            return be.load_weight(t.row_bytes(p.rows.clone())?, t.dtype()?, &shape);
        }
        // A quantized checkpoint tensor: decoded on the host into the dtype the backend keeps
        // weights in.
        let dtype = be.decoded_weight_dtype();
        be.load_weight(&crate::dtype::encode_from_f32(&t.rows_f32(p.rows.clone())?, dtype), dtype, &shape)
    }
}
