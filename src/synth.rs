//! Random-weight checkpoints with the exact real tensor names and shapes, so loaders, memory
//! planning and benchmarks run at real size without downloading weights. Values are a pure
//! function of (seed, diffusers tensor name, element), so the diffusers and BFL layouts written
//! from one seed hold the same model.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::dtype::{encode_from_f32, DType};
use crate::error::{Error, Result};
use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::layout::{bfl_tensors, diffusers_tensors, Layout, RowSlice};
use crate::rng::{stream_key, uniform};
use crate::weights::safetensors::{write_safetensors, TensorEntry};
use crate::weights::TensorSpec;

/// Shard size for diffusers-layout folders (the Hugging Face convention of ~5 GB shards).
pub const SHARD_BYTES: usize = 5_000_000_000;

/// Deterministic initial values: scales (norm weights, BatchNorm variance) 1 ± 0.1, offsets
/// (biases, BatchNorm mean) ± 0.02, matrices uniform in ±1/sqrt(fan_in) like PyTorch's default
/// `nn.Linear` / `nn.Conv2d` init.
pub struct Initializer {
    pub seed: u64,
}

#[derive(Clone, Copy)]
enum Kind {
    Scale,
    Offset,
    Matrix(f32),
}

fn kind(name: &str, shape: &[usize]) -> Kind {
    if name.ends_with(".bias") || name.ends_with("running_mean") {
        Kind::Offset
    } else if shape.len() == 1 {
        Kind::Scale
    } else {
        Kind::Matrix(1.0 / (shape[1..].iter().product::<usize>().max(1) as f32).sqrt())
    }
}

impl Initializer {
    /// Rows `rows` of tensor `name` (shape `shape`), flattened.
    pub fn rows(&self, name: &str, shape: &[usize], rows: std::ops::Range<usize>) -> Vec<f32> {
        let key = stream_key(self.seed, name);
        let row_len: usize = shape[1..].iter().product();
        let k = kind(name, shape);
        (rows.start * row_len..rows.end * row_len)
            .into_par_iter()
            .map(|i| {
                let u = uniform(key, i as u64) * 2.0 - 1.0;
                match k {
                    Kind::Scale => 1.0 + 0.1 * u,
                    Kind::Offset => 0.02 * u,
                    Kind::Matrix(bound) => bound * u,
                }
            })
            .collect()
    }
}

/// Stream `parts` (rows of generated tensors) into `w` as `dtype`, a few MB at a time.
fn write_parts(
    w: &mut dyn Write,
    init: &Initializer,
    parts: &[(RowSlice, Vec<usize>)],
    dtype: DType,
) -> std::io::Result<()> {
    for (part, shape) in parts {
        let row_len: usize = shape[1..].iter().product::<usize>().max(1);
        let rows_per_chunk = (4 << 20) / row_len + 1;
        let mut r = part.rows.start;
        while r < part.rows.end {
            let end = (r + rows_per_chunk).min(part.rows.end);
            w.write_all(&encode_from_f32(&init.rows(&part.name, shape, r..end), dtype))?;
            r = end;
        }
    }
    Ok(())
}

fn entry<'a>(
    spec: TensorSpec,
    parts: Vec<(RowSlice, Vec<usize>)>,
    init: &'a Initializer,
    dtype: DType,
) -> TensorEntry<'a> {
    TensorEntry {
        name: spec.name,
        dtype,
        shape: spec.shape,
        write: Box::new(move |w| write_parts(w, init, &parts, dtype)),
    }
}

fn metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// Write a transformer checkpoint. Diffusers: `DIR/transformer/config.json` plus (sharded)
/// `diffusion_pytorch_model*.safetensors`; BFL: one `DIR/<file_name>`. Returns the written paths.
pub fn write_transformer(
    cfg: &TransformerConfig,
    layout: Layout,
    dtype: DType,
    seed: u64,
    dir: &Path,
    file_name: &str,
) -> Result<Vec<PathBuf>> {
    cfg.validate().map_err(|r| Error::config(dir, r))?;
    let init = Initializer { seed };
    let shapes: BTreeMap<String, Vec<usize>> = diffusers_tensors(cfg).into_iter().map(|t| (t.name, t.shape)).collect();
    match layout {
        Layout::Bfl => {
            let path = dir.join(file_name);
            let entries = bfl_tensors(cfg)
                .into_iter()
                .map(|(spec, parts)| {
                    let parts = parts
                        .into_iter()
                        .map(|p| {
                            let s = shapes[&p.name].clone();
                            (p, s)
                        })
                        .collect();
                    entry(spec, parts, &init, dtype)
                })
                .collect();
            write_safetensors(&path, entries, &metadata())?;
            Ok(vec![path])
        }
        Layout::Diffusers => {
            let tdir = dir.join("transformer");
            std::fs::create_dir_all(&tdir).map_err(|e| Error::io(&tdir, e))?;
            let config_path = tdir.join("config.json");
            let mut config = serde_json::to_value(cfg).unwrap();
            config["_class_name"] = "Flux2Transformer2DModel".into();
            config["_diffusers_version"] = "0.42.1".into();
            write_json(&config_path, &config)?;
            let specs = diffusers_tensors(cfg);
            let mut written = vec![config_path];
            written.extend(write_sharded(&tdir, "diffusion_pytorch_model", specs, &init, dtype)?);
            Ok(written)
        }
    }
}

/// Bytes of one tensor's data (saturating: an absurd config must fail the space check, not wrap).
fn tensor_bytes(spec: &TensorSpec, dtype: DType) -> u64 {
    spec.shape.iter().fold(dtype.size_in_bytes() as u64, |a, &d| a.saturating_mul(d as u64))
}

/// Upper bound on what `specs` take on disk in `dtype`: the data, each tensor's header entry and
/// index line, and a little per shard and per file.
fn tensors_on_disk<'a>(specs: impl IntoIterator<Item = &'a TensorSpec>, dtype: DType) -> u64 {
    let (mut data, mut meta) = (0u64, 4096u64);
    for s in specs {
        data = data.saturating_add(tensor_bytes(s, dtype));
        meta = meta.saturating_add(2 * s.name.len() as u64 + 160 + 21 * s.shape.len() as u64);
    }
    data.saturating_add(meta).saturating_add((data / SHARD_BYTES as u64 + 1).saturating_mul(4096))
}

/// What `write_transformer` will write, in bytes (an upper bound, for the free-space check).
pub fn transformer_bytes(cfg: &TransformerConfig, layout: Layout, dtype: DType) -> u64 {
    match layout {
        Layout::Diffusers => tensors_on_disk(&diffusers_tensors(cfg), dtype).saturating_add(4096),
        Layout::Bfl => tensors_on_disk(bfl_tensors(cfg).iter().map(|(spec, _)| spec), dtype),
    }
}

/// What `write_pipeline` will write, in bytes (an upper bound, for the free-space check).
pub fn pipeline_bytes(spec: &PipelineSpec, dtype: DType, tokenizer: Option<&Path>) -> u64 {
    let vae_dtype = if dtype == DType::F8E4M3 { DType::BF16 } else { dtype };
    let tokenizer_bytes = match tokenizer {
        Some(src) => std::fs::read_dir(src)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok().filter(|m| m.is_file()))
            .fold(0u64, |a, m| a.saturating_add(m.len())),
        None => serde_json::to_string_pretty(&byte_level_tokenizer()).map_or(0, |t| t.len() as u64),
    };
    [
        transformer_bytes(&spec.transformer, Layout::Diffusers, dtype),
        tensors_on_disk(&crate::model::qwen3::tensors(&spec.text_encoder), dtype),
        tensors_on_disk(&crate::model::vae::tensors(&spec.vae), vae_dtype),
        tokenizer_bytes,
        // The small JSON files: configs, model index, tokenizer config.
        64 << 10,
    ]
    .iter()
    .fold(0u64, |a, &b| a.saturating_add(b))
}

/// Free bytes for an unprivileged user on the filesystem that will hold `dir` (which may not
/// exist yet: its nearest existing ancestor is asked). None where the platform cannot say.
pub fn available_space(dir: &Path) -> Option<u64> {
    let absolute = std::path::absolute(dir).ok()?;
    let existing = absolute.ancestors().find(|p| p.exists())?;
    free_bytes(existing)
}

#[cfg(any(unix, windows))]
fn free_bytes(existing: &Path) -> Option<u64> {
    fs4::available_space(existing).ok()
}

#[cfg(not(any(unix, windows)))]
fn free_bytes(_: &Path) -> Option<u64> {
    None
}

/// Refuse to start a write of `needed` bytes into `dir` that cannot fit in `available` bytes
/// (an unknown amount of free space is not a reason to refuse).
pub fn ensure_space(dir: &Path, needed: u64, available: Option<u64>) -> Result<()> {
    match available {
        Some(free) if needed > free => Err(Error::InvalidArgument(format!(
            "{}: the checkpoint needs about {} but its filesystem has only {} free",
            dir.display(),
            human_bytes(needed),
            human_bytes(free)
        ))),
        _ => Ok(()),
    }
}

/// `1234567890` -> `1.23 GB (1234567890 bytes)`.
pub fn human_bytes(n: u64) -> String {
    let units = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    match units.iter().find(|(scale, _)| n as f64 >= *scale) {
        Some((scale, unit)) => format!("{:.2} {unit} ({n} bytes)", n as f64 / scale),
        None => format!("{n} bytes"),
    }
}

/// Sizes are never filled in from defaults in `synth`: a config that omits one would silently
/// get FLUX.2 [dev]-sized (or other large) tensors, gigabytes the user did not ask for.
pub fn require_keys(path: &Path, keys: &[&str]) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| Error::config(path, "not a JSON object"))?;
    let missing: Vec<&str> = keys.iter().copied().filter(|k| !obj.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(Error::config(path, format!("missing {} (synth takes no default for a size)", missing.join(", "))));
    }
    Ok(())
}

/// Write whole generated tensors into `<stem>.safetensors`, or into numbered shards of about
/// [`SHARD_BYTES`] plus `<stem>.safetensors.index.json` when they do not fit in one.
pub fn write_sharded(
    dir: &Path,
    stem: &str,
    specs: Vec<TensorSpec>,
    init: &Initializer,
    dtype: DType,
) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut size = 0usize;
    for s in specs {
        let bytes = tensor_bytes(&s, dtype) as usize;
        if size > 0 && size + bytes > SHARD_BYTES {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push(s);
    }
    let n = shards.len();
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.into_iter().enumerate() {
        let file =
            if n == 1 { format!("{stem}.safetensors") } else { format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1) };
        let entries = shard
            .into_iter()
            .map(|s| {
                weight_map.insert(s.name.clone(), file.clone().into());
                total += tensor_bytes(&s, dtype) as usize;
                let parts = vec![(RowSlice { name: s.name.clone(), rows: 0..s.shape[0] }, s.shape.clone())];
                entry(s, parts, init, dtype)
            })
            .collect();
        let path = dir.join(&file);
        write_safetensors(&path, entries, &metadata())?;
        written.push(path);
    }
    if n > 1 {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        let json = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&index, &json)?;
        written.push(index);
    }
    Ok(written)
}

/// The configs of a whole klein pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub transformer: TransformerConfig,
    pub text_encoder: crate::model::qwen3::Qwen3Config,
    pub vae: crate::model::vae::VaeConfig,
    pub distilled: bool,
    /// The KV variant (`Flux2KleinKVPipeline`).
    pub kv: bool,
    /// Block linears the transformer checkpoint stores as GGUF blocks, with their bytes (a GPU
    /// keeps them so); empty for other checkpoints.
    pub stored_blocks: crate::planner::estimate::StoredBytes,
    /// Block linears stored as scaled e4m3 (codes and row scales), with their bytes (a backend that
    /// keeps FP8 codes, `Backend::keeps_fp8_codes`, holds them so); empty for other checkpoints.
    pub stored_fp8: crate::planner::estimate::StoredBytes,
}

impl PipelineSpec {
    pub fn klein_4b() -> Self {
        PipelineSpec {
            transformer: TransformerConfig::klein_4b(),
            text_encoder: crate::model::qwen3::Qwen3Config::qwen3_4b(),
            vae: Default::default(),
            distilled: true,
            kv: false,
            stored_blocks: Default::default(),
            stored_fp8: Default::default(),
        }
    }

    pub fn klein_9b() -> Self {
        PipelineSpec {
            transformer: TransformerConfig::klein_9b(),
            text_encoder: crate::model::qwen3::Qwen3Config::qwen3_8b(),
            vae: Default::default(),
            distilled: true,
            kv: false,
            stored_blocks: Default::default(),
            stored_fp8: Default::default(),
        }
    }

    /// The configs of an existing pipeline folder.
    pub fn from_pipeline(root: &Path) -> Result<Self> {
        PipelineSpec::from_info(&crate::pipeline::PipelineInfo::read(root)?)
    }

    /// The configs of a pipeline's components: each folder's config.json, or for single files the
    /// config read off their shapes (as loading them does).
    pub fn from_info(info: &crate::pipeline::PipelineInfo) -> Result<Self> {
        let json = |dir: &Path| Some(dir.join("config.json")).filter(|p| dir.is_dir() && p.is_file());
        let (store, layout, transformer) = crate::model::transformer::open(&info.transformer)?;
        let transformer = match json(&info.transformer) {
            Some(p) => TransformerConfig::from_json_file(&p)?,
            None => transformer,
        };
        let weights = crate::model::transformer::layout::TransformerWeights::new(
            std::sync::Arc::new(store),
            layout,
            &transformer,
        );
        use crate::planner::estimate::StoredBytes;
        let (mut stored_blocks, mut stored_fp8) = (StoredBytes::new(), StoredBytes::new());
        for t in crate::model::transformer::layout::diffusers_tensors(&transformer) {
            if let Some(bytes) = weights.stored_block_size(&t.name, &t.shape)? {
                stored_blocks.insert(t.name, bytes);
            } else if let Some(bytes) = weights.stored_scaled_fp8_size(&t.name, &t.shape)? {
                stored_fp8.insert(t.name, bytes);
            }
        }
        let text_encoder = match json(&info.text_encoder) {
            Some(p) => crate::model::qwen3::Qwen3Config::from_json_file(&p)?,
            None => crate::model::qwen3::open(&info.text_encoder)?.1,
        };
        let vae = match json(&info.vae) {
            Some(p) => crate::model::vae::VaeConfig::from_json_file(&p)?,
            None => crate::model::vae::open(&info.vae)?.2,
        };
        Ok(PipelineSpec {
            transformer,
            text_encoder,
            vae,
            distilled: info.is_distilled,
            kv: info.kv,
            stored_blocks,
            stored_fp8,
        })
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::output_file::write_bytes(path, (serde_json::to_string_pretty(value).unwrap() + "\n").as_bytes())?;
    Ok(path.to_path_buf())
}

/// Write a complete diffusers-layout klein pipeline with random weights. The tokenizer is copied
/// from `tokenizer` when given, else a byte-level stand-in with Qwen3's special tokens is written
/// (it tokenizes every text, one token per UTF-8 byte, so the pipeline runs end to end).
pub fn write_pipeline(
    spec: &PipelineSpec,
    dtype: DType,
    seed: u64,
    dir: &Path,
    tokenizer: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let mut written = write_transformer(&spec.transformer, Layout::Diffusers, dtype, seed, dir, "")?;
    let init = Initializer { seed };

    let te = dir.join("text_encoder");
    let mut te_cfg = serde_json::to_value(&spec.text_encoder).unwrap();
    te_cfg["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
    te_cfg["model_type"] = "qwen3".into();
    te_cfg["torch_dtype"] = dtype_name(dtype).into();
    written.push(write_json(&te.join("config.json"), &te_cfg)?);
    written.extend(write_sharded(&te, "model", crate::model::qwen3::tensors(&spec.text_encoder), &init, dtype)?);

    let vae = dir.join("vae");
    let mut vae_cfg = serde_json::to_value(&spec.vae).unwrap();
    vae_cfg["_class_name"] = "AutoencoderKLFlux2".into();
    written.push(write_json(&vae.join("config.json"), &vae_cfg)?);
    // The VAE runs in float32 in the BFL reference; keep its weights at least f16-exact.
    let vae_dtype = if dtype == DType::F8E4M3 { DType::BF16 } else { dtype };
    written.extend(write_sharded(
        &vae,
        "diffusion_pytorch_model",
        crate::model::vae::tensors(&spec.vae),
        &init,
        vae_dtype,
    )?);

    written.push(write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &serde_json::json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": true, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096, "time_shift_type": "exponential",
        }),
    )?);

    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).map_err(|e| Error::io(&tok, e))?;
    match tokenizer {
        Some(src) => {
            for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
                let p = entry.map_err(|e| Error::io(src, e))?.path();
                if p.is_file() {
                    let to = tok.join(p.file_name().unwrap());
                    std::fs::copy(&p, &to).map_err(|e| Error::io(&p, e))?;
                    written.push(to);
                }
            }
        }
        None => written.push(write_json(&tok.join("tokenizer.json"), &byte_level_tokenizer())?),
    }
    written.push(write_json(&tok.join("tokenizer_config.json"), &serde_json::json!({"tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "padding_side": "right"}))?);

    let mut index = serde_json::json!({
        "_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    });
    if spec.distilled {
        index["is_distilled"] = true.into();
    }
    written.push(write_json(&dir.join("model_index.json"), &index)?);
    Ok(written)
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F8E4M3 => "float8_e4m3fn",
        DType::U8 => "uint8",
    }
}

/// GPT-2's byte-to-unicode map (what byte-level BPE tokens are spelled in).
fn byte_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in printable.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A tokenizer.json with one token per byte (ids 0..256) and Qwen3's added tokens at their ids.
fn byte_level_tokenizer() -> serde_json::Value {
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        byte_to_unicode().into_iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ];
    // Added tokens keep their ids only if the model vocabulary holds them too.
    for (i, c) in specials.iter().enumerate() {
        vocab.insert(c.to_string(), (151643 + i).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"id": 151643 + i, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": i < 14}))
        .collect();
    let byte_level =
        serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "NFC"}, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    })
}
