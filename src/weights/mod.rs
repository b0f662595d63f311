//! Checkpoint access: one safetensors file, a sharded set with its `*.safetensors.index.json`, or
//! a folder holding either. Tensors are memory-mapped and read lazily, one at a time; every error
//! names the file and the key.

pub mod ggml;
pub mod gguf;
pub mod mapping;
pub mod safetensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use self::safetensors::{SafetensorsFile, TensorInfo};
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct WeightStore {
    /// What the user pointed at (a file, an index or a folder), for error messages.
    origin: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Key -> index into `files`.
    index: HashMap<String, usize>,
    /// Prepended to every lookup (e.g. "model.diffusion_model." in ComfyUI single files).
    prefix: String,
}

/// A tensor's name and shape: what a model expects, or what `synth` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), shape: shape.to_vec() }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX)
    }
}

/// A tensor's location and raw bytes inside a mapped file.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub info: &'a TensorInfo,
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    pub fn shape(&self) -> &[usize] {
        &self.info.shape
    }

    /// The engine dtype, or an error naming the file and key.
    pub fn dtype(&self) -> Result<DType> {
        self.info.dtype().ok_or_else(|| Error::UnsupportedDType {
            path: self.path.to_path_buf(),
            key: self.name.to_string(),
            dtype: self.info.dtype.clone(),
        })
    }

    /// Values widened to f32 (for small tensors: scales, norms, statistics).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(crate::dtype::decode_to_f32(self.bytes, self.dtype()?))
    }
}

impl WeightStore {
    /// Open a `.safetensors` file, a `.safetensors.index.json`, or a folder with either
    /// (an index wins; otherwise every `*.safetensors` in the folder).
    pub fn open(path: &Path) -> Result<WeightStore> {
        if path.is_dir() {
            let mut indices = Vec::new();
            let mut files = Vec::new();
            for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
                let p = entry.map_err(|e| Error::io(path, e))?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                if name.ends_with(".safetensors.index.json") {
                    indices.push(p);
                } else if name.ends_with(".safetensors") {
                    files.push(p);
                }
            }
            indices.sort();
            files.sort();
            return match (indices.as_slice(), files.is_empty()) {
                ([index], _) => WeightStore::open_index(index),
                ([], false) => WeightStore::from_files(path, files),
                ([], true) => Err(Error::config(path, "no .safetensors files in this folder")),
                _ => Err(Error::config(path, format!("several safetensors index files: {indices:?}"))),
            };
        }
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }
        if path.to_string_lossy().ends_with(".json") {
            return WeightStore::open_index(path);
        }
        WeightStore::from_files(path, vec![path.to_path_buf()])
    }

    fn open_index(index_path: &Path) -> Result<WeightStore> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(index_path, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(index_path, "no `weight_map` object"))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if shard_names.len() != map.len() {
            return Err(Error::config(index_path, "`weight_map` values must be file names"));
        }
        shard_names.sort();
        shard_names.dedup();
        let store = WeightStore::from_files(index_path, shard_names.iter().map(|n| dir.join(n)).collect())?;
        for (key, shard) in map {
            let shard = shard.as_str().unwrap();
            match store.index.get(key) {
                Some(&i) if store.files[i].path().ends_with(shard) => {}
                _ => {
                    return Err(Error::MissingKey {
                        path: dir.join(shard),
                        key: format!("{key} (listed in {})", index_path.display()),
                    })
                }
            }
        }
        Ok(store)
    }

    fn from_files(origin: &Path, paths: Vec<PathBuf>) -> Result<WeightStore> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for p in paths {
            let f = SafetensorsFile::open(&p)?;
            for name in f.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), files.len()) {
                    let prev: &SafetensorsFile = &files[prev];
                    return Err(Error::config(
                        origin,
                        format!("tensor `{name}` appears in both {} and {}", prev.path().display(), p.display()),
                    ));
                }
            }
            files.push(f);
        }
        Ok(WeightStore { origin: origin.to_path_buf(), files, index, prefix: String::new() })
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Look every key up under `prefix` from now on.
    pub fn set_prefix(&mut self, prefix: &str) {
        self.prefix = prefix.to_string();
    }

    /// All keys (with the lookup prefix removed; keys outside it are skipped).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().filter_map(move |k| k.strip_prefix(self.prefix.as_str()))
    }

    pub fn len(&self) -> usize {
        self.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(&format!("{}{name}", self.prefix))
    }

    pub fn get(&self, name: &str) -> Result<RawTensor<'_>> {
        let full = format!("{}{name}", self.prefix);
        let (key, &i) = self
            .index
            .get_key_value(&full)
            .ok_or_else(|| Error::MissingKey { path: self.origin.clone(), key: full.clone() })?;
        let file = &self.files[i];
        let info = file.info(key).expect("index and file agree");
        Ok(RawTensor { name: key, path: file.path(), info, bytes: file.bytes(info) })
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.get(name)?.info.shape.clone())
    }

    /// The shape of `name`, which must have `N` dims (configs inferred from shapes index them).
    pub fn dims<const N: usize>(&self, name: &str) -> Result<[usize; N]> {
        let shape = &self.get(name)?.info.shape;
        shape.as_slice().try_into().map_err(|_| {
            Error::config(&self.origin, format!("tensor `{name}` has shape {shape:?}; expected {N} dimensions"))
        })
    }

    /// The tensor, after checking its shape.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<RawTensor<'_>> {
        let t = self.get(name)?;
        if t.info.shape != expected {
            return Err(Error::WrongShape {
                path: t.path.to_path_buf(),
                key: t.name.to_string(),
                expected: expected.to_vec(),
                got: t.info.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Load a tensor of the expected shape onto a backend, in its stored dtype's precision.
    pub fn load(&self, be: &dyn Backend, name: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self.get_shaped(name, expected)?;
        let _scope = crate::backend::scope::enter(|| format!("weight `{name}` of {}", self.origin.display()));
        be.load_weight(t.bytes, t.dtype()?, expected)
    }

    /// Total bytes per stored dtype.
    pub fn bytes_per_dtype(&self) -> Vec<(String, usize, usize)> {
        let mut by: HashMap<String, (usize, usize)> = HashMap::new();
        for name in self.keys() {
            let info = self.get(name).expect("listed key").info;
            let e = by.entry(info.dtype.clone()).or_default();
            // Saturating: a sum over many files must not wrap into a small, plausible number.
            e.0 = e.0.saturating_add(info.numel());
            e.1 = e.1.saturating_add(info.end - info.start);
        }
        let mut v: Vec<_> = by.into_iter().map(|(d, (n, b))| (d, n, b)).collect();
        v.sort();
        v
    }
}
