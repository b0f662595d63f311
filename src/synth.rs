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
use crate::model::transformer::layout::{bfl_tensors, diffusers_tensors, Layout, RowSlice, TensorSpec};
use crate::rng::{stream_key, uniform};
use crate::weights::safetensors::{write_safetensors, TensorEntry};

/// Shard size for diffusers-layout folders (the Hugging Face convention of ~5 GB shards).
pub const SHARD_BYTES: usize = 5_000_000_000;

/// Deterministic initial values: vectors (norm scales) are 1 ± 0.1, matrices uniform in
/// ±1/sqrt(fan_in) like PyTorch's default `nn.Linear` init.
pub struct Initializer {
    pub seed: u64,
}

impl Initializer {
    pub fn value(&self, key: u64, shape: &[usize], i: usize) -> f32 {
        let u = uniform(key, i as u64) * 2.0 - 1.0;
        if shape.len() == 1 {
            1.0 + 0.1 * u
        } else {
            let fan_in: usize = shape[1..].iter().product();
            u / (fan_in.max(1) as f32).sqrt()
        }
    }

    /// Rows `rows` of tensor `name` (shape `shape`), flattened.
    pub fn rows(&self, name: &str, shape: &[usize], rows: std::ops::Range<usize>) -> Vec<f32> {
        let key = stream_key(self.seed, name);
        let row_len: usize = shape[1..].iter().product();
        (rows.start * row_len..rows.end * row_len).into_par_iter().map(|i| self.value(key, shape, i)).collect()
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
            std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap() + "\n")
                .map_err(|e| Error::io(&config_path, e))?;
            let specs = diffusers_tensors(cfg);
            let mut written = vec![config_path];
            written.extend(write_sharded(&tdir, "diffusion_pytorch_model", specs, &init, dtype)?);
            Ok(written)
        }
    }
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
        let bytes = s.shape.iter().product::<usize>() * dtype.size_in_bytes();
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
                total += s.shape.iter().product::<usize>() * dtype.size_in_bytes();
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
        std::fs::write(&index, serde_json::to_string_pretty(&json).unwrap() + "\n")
            .map_err(|e| Error::io(&index, e))?;
        written.push(index);
    }
    Ok(written)
}
