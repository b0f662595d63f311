//! Checkpoint access: one safetensors file, a sharded set with its `*.safetensors.index.json`, a
//! GGUF file, or a folder holding either. Tensors are memory-mapped and read lazily, one at a
//! time; every error names the file and the key. Quantized layers (GGUF blocks, ComfyUI markers,
//! scaled fp8) are seen through their logical shape and an [`Encoding`] that decodes them exactly.

pub mod comfy_quant;
pub mod encoding;
pub mod ggml;
pub mod gguf;
pub mod gguf_names;
pub mod mapping;
pub mod safetensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use self::comfy_quant::Marker;
pub use self::encoding::Encoding;
use self::gguf::GgufFile;
use self::safetensors::SafetensorsFile;
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Which file a key lives in.
#[derive(Debug, Clone, Copy)]
enum Source {
    Safetensors(usize),
    Gguf(usize),
}

#[derive(Debug)]
pub struct WeightStore {
    /// What the user pointed at (a file, an index or a folder), for error messages.
    origin: PathBuf,
    files: Vec<SafetensorsFile>,
    gguf: Vec<GgufFile>,
    /// Key -> file and the tensor's name inside it (GGUF names may be translated, see
    /// `gguf_names`).
    index: HashMap<String, (Source, String)>,
    /// ComfyUI layer markers from the files' `_quantization_metadata` headers, by layer name.
    header_markers: HashMap<String, serde_json::Value>,
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

/// A tensor inside a mapped file: its logical shape, how its bytes encode the values, the bytes.
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    /// The key (with the store's prefix).
    pub name: &'a str,
    pub path: &'a Path,
    /// The logical shape (for packed formats, not the stored one).
    pub shape: Vec<usize>,
    /// The type as the file spells it ("BF16", "F8_E4M3", "Q4_K", ...).
    pub stored_dtype: String,
    pub encoding: Encoding<'a>,
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX)
    }

    /// Whether the bytes are plain values of a dtype the backends load directly.
    pub fn is_dense(&self) -> bool {
        matches!(self.encoding, Encoding::Dense(_))
    }

    /// The engine dtype of a plain tensor, or an error naming the file and key.
    pub fn dtype(&self) -> Result<DType> {
        match self.encoding {
            Encoding::Dense(d) => Ok(d),
            _ => Err(Error::UnsupportedDType {
                path: self.path.to_path_buf(),
                key: self.name.to_string(),
                dtype: self.encoding.describe(),
            }),
        }
    }

    /// (rows, columns) as a matrix: the first dimension, and the product of the others.
    fn matrix(&self) -> (usize, usize) {
        match self.shape.split_first() {
            Some((&rows, rest)) => (rows, rest.iter().product()),
            None => (1, 1),
        }
    }

    /// All values, decoded to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.rows_f32(0..self.matrix().0)
    }

    /// Rows `rows` (of the first dimension), decoded to f32.
    pub fn rows_f32(&self, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let (total, cols) = self.matrix();
        let fail = |reason: String| Error::CorruptFile {
            path: self.path.to_path_buf(),
            reason: format!("tensor `{}` ({}): {reason}", self.name, self.encoding.describe()),
        };
        if rows.end > total || rows.start > rows.end {
            return Err(fail(format!("rows {rows:?} of {total}")));
        }
        if let Encoding::Unsupported(_) = self.encoding {
            return Err(self.dtype().unwrap_err());
        }
        // Block formats (GGML) may pack a whole 1-D tensor, or rows not a block multiple, only as
        // one piece: decode everything, then slice.
        match self.encoding.row_bytes(cols) {
            Some(rb) => {
                self.encoding.decode_rows(&self.bytes[rows.start * rb..rows.end * rb], rows.start, rows.len(), cols)
            }
            None => {
                let all = self.encoding.decode_rows(self.bytes, 0, 1, total * cols);
                all.map(|v| v[rows.start * cols..rows.end * cols].to_vec())
            }
        }
        .map_err(fail)
    }

    /// The bytes of rows `rows` of a plain tensor (for loading a slice without a copy).
    pub fn row_bytes(&self, rows: std::ops::Range<usize>) -> Result<&[u8]> {
        let (total, cols) = self.matrix();
        let rb = cols * self.dtype()?.size_in_bytes();
        if rows.end > total {
            return Err(Error::shape("rows", format!("rows {rows:?} of `{}` with {total}", self.name)));
        }
        Ok(&self.bytes[rows.start * rb..rows.end * rb])
    }

    /// Load onto a backend: plain tensors in their stored precision, quantized ones decoded on the
    /// host into the backend's compute dtype.
    pub fn load(&self, be: &dyn Backend) -> Result<Tensor> {
        if let Encoding::Dense(d) = self.encoding {
            return be.load_weight(self.bytes, d, &self.shape);
        }
        let dtype = be.decoded_weight_dtype();
        be.load_weight(&crate::dtype::encode_from_f32(&self.to_f32()?, dtype), dtype, &self.shape)
    }
}

impl WeightStore {
    /// Open a `.safetensors` file, a `.safetensors.index.json`, a `.gguf` file, or a folder with
    /// either (an index wins; otherwise every `*.safetensors`, or every `*.gguf`, in the folder).
    pub fn open(path: &Path) -> Result<WeightStore> {
        if path.is_dir() {
            let mut indices = Vec::new();
            let mut files = Vec::new();
            let mut ggufs = Vec::new();
            for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
                let p = entry.map_err(|e| Error::io(path, e))?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                if name.ends_with(".safetensors.index.json") {
                    indices.push(p);
                } else if name.ends_with(".safetensors") {
                    files.push(p);
                } else if name.ends_with(".gguf") {
                    ggufs.push(p);
                }
            }
            indices.sort();
            files.sort();
            ggufs.sort();
            return match (indices.as_slice(), files.is_empty(), ggufs.is_empty()) {
                ([index], _, _) => WeightStore::open_index(index),
                ([], false, _) => WeightStore::from_files(path, files),
                ([], true, false) => WeightStore::from_files(path, ggufs),
                ([], true, true) => Err(Error::config(path, "no .safetensors or .gguf files in this folder")),
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
                Some((source, _)) if store.file_path(*source).ends_with(shard) => {}
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
        let mut store = WeightStore {
            origin: origin.to_path_buf(),
            files: Vec::new(),
            gguf: Vec::new(),
            index: HashMap::new(),
            header_markers: HashMap::new(),
            prefix: String::new(),
        };
        for p in paths {
            let entries: Vec<(String, (Source, String))> = if GgufFile::is_gguf(&p) {
                let f = GgufFile::open(&p)?;
                let source = Source::Gguf(store.gguf.len());
                // llama.cpp names a Qwen3 encoder's tensors its own way; we load Hugging Face names.
                let arch = f.metadata.get("general.architecture").and_then(|v| v.as_str()).unwrap_or_default();
                let translate = matches!(arch, "qwen3" | "qwen2");
                let entries = f
                    .tensors()
                    .iter()
                    .map(|t| {
                        let name = if translate { gguf_names::qwen3_hf_name(&t.name) } else { None };
                        (name.unwrap_or_else(|| t.name.clone()), (source, t.name.clone()))
                    })
                    .collect();
                store.gguf.push(f);
                entries
            } else {
                let f = SafetensorsFile::open(&p)?;
                let markers = comfy_quant::header_markers(f.metadata())
                    .map_err(|reason| Error::CorruptFile { path: p.clone(), reason })?;
                store.header_markers.extend(markers);
                let source = Source::Safetensors(store.files.len());
                let entries = f.tensors().keys().map(|k| (k.clone(), (source, k.clone()))).collect();
                store.files.push(f);
                entries
            };
            for (name, entry) in entries {
                let this = store.file_path(entry.0).to_path_buf();
                if let Some((prev, _)) = store.index.insert(name.clone(), entry) {
                    return Err(Error::config(
                        origin,
                        format!(
                            "tensor `{name}` appears in both {} and {}",
                            store.file_path(prev).display(),
                            this.display()
                        ),
                    ));
                }
            }
        }
        Ok(store)
    }

    fn file_path(&self, source: Source) -> &Path {
        match source {
            Source::Safetensors(i) => self.files[i].path(),
            Source::Gguf(i) => self.gguf[i].path(),
        }
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The safetensors files (GGUF files are in [`WeightStore::gguf_files`]).
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    pub fn gguf_files(&self) -> &[GgufFile] {
        &self.gguf
    }

    /// Number of files of either format.
    pub fn file_count(&self) -> usize {
        self.files.len() + self.gguf.len()
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
        self.get_full(&format!("{}{name}", self.prefix))
    }

    /// The tensor under its full key (no prefix added).
    fn get_full(&self, full: &str) -> Result<RawTensor<'_>> {
        let (key, (source, inner)) = self
            .index
            .get_key_value(full)
            .ok_or_else(|| Error::MissingKey { path: self.origin.clone(), key: full.into() })?;
        match *source {
            Source::Gguf(i) => {
                let f = &self.gguf[i];
                let t = f.get(inner).expect("index and file agree");
                let encoding = match t.ggml_type() {
                    Some(ty) => Encoding::Ggml(ty),
                    None => Encoding::Unsupported(format!("GGML {}", ggml::GgmlType::name_of_id(t.type_id))),
                };
                Ok(RawTensor {
                    name: key,
                    path: f.path(),
                    shape: t.shape.clone(),
                    stored_dtype: ggml::GgmlType::name_of_id(t.type_id),
                    encoding,
                    bytes: f.bytes(t),
                })
            }
            Source::Safetensors(i) => {
                let f = &self.files[i];
                let info = f.info(inner).expect("index and file agree");
                let bytes = f.bytes(info);
                let fail = |reason: String| Error::CorruptFile {
                    path: f.path().to_path_buf(),
                    reason: format!("tensor `{key}`: {reason}"),
                };
                let (shape, encoding) =
                    self.safetensors_encoding(key, &info.dtype, &info.shape).map_err(|e| match e {
                        Error::Config { reason, .. } => fail(reason),
                        e => e,
                    })?;
                Ok(RawTensor { name: key, path: f.path(), shape, stored_dtype: info.dtype.clone(), encoding, bytes })
            }
        }
    }

    /// A safetensors tensor's logical shape and encoding: its dtype, or for a quantized layer's
    /// `.weight` what its ComfyUI marker (or, in older files, its scale tensor) says.
    fn safetensors_encoding<'a>(
        &'a self,
        key: &str,
        dtype: &str,
        shape: &[usize],
    ) -> Result<(Vec<usize>, Encoding<'a>)> {
        let bad = |reason: String| Error::config(&self.origin, reason);
        let plain = match safetensors::engine_dtype(dtype) {
            Some(d) => Encoding::Dense(d),
            None if dtype == "F8_E5M2" => Encoding::ScaledFp8 { scales: vec![1.0], e5m2: true },
            None => Encoding::Unsupported(dtype.to_string()),
        };
        let Some(stem) = key.strip_suffix(".weight") else { return Ok((shape.to_vec(), plain)) };
        let marker = match self.index.get(&format!("{stem}.comfy_quant")) {
            Some(_) => Some(comfy_quant::parse_bytes(self.get_full(&format!("{stem}.comfy_quant"))?.bytes)),
            None => self.header_markers.get(stem).map(comfy_quant::parse),
        };
        let rows = shape.first().copied().unwrap_or(1);
        let scales = |suffix: &str| -> Result<Vec<f32>> {
            let t = self.get_full(&format!("{stem}.{suffix}"))?;
            let v = t.to_f32()?;
            if v.len() != 1 && v.len() != rows {
                return Err(bad(format!(
                    "`{stem}.{suffix}` has {} values; expected 1 or one per row ({rows})",
                    v.len()
                )));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("`{stem}.{suffix}` holds NaN or inf")));
            }
            Ok(v)
        };
        let Some(marker) = marker else {
            // Older scaled-fp8 files and the official fp8 releases: an fp8 weight with a scale.
            let is_fp8 = matches!(dtype, "F8_E4M3" | "F8_E5M2");
            for suffix in ["weight_scale", "scale_weight"] {
                if is_fp8 && self.index.contains_key(&format!("{stem}.{suffix}")) {
                    return Ok((
                        shape.to_vec(),
                        Encoding::ScaledFp8 { scales: scales(suffix)?, e5m2: dtype == "F8_E5M2" },
                    ));
                }
            }
            return Ok((shape.to_vec(), plain));
        };
        let marker = marker.map_err(|r| bad(format!("layer `{stem}`: {r}")))?;
        if !marker.storage_dtype().contains(&dtype) {
            return Err(bad(format!(
                "layer `{stem}` is marked {marker:?} but its weight is stored as {dtype} (expected {})",
                marker.storage_dtype().join(" or ")
            )));
        }
        if shape.len() != 2 {
            return Err(bad(format!("quantized layer `{stem}` has a {}-D weight; expected 2-D", shape.len())));
        }
        Ok(match marker {
            Marker::Fp8E4M3 | Marker::Fp8E5M2 => (
                shape.to_vec(),
                Encoding::ScaledFp8 { scales: scales("weight_scale")?, e5m2: marker == Marker::Fp8E5M2 },
            ),
            Marker::Int8 { convrot_group } => {
                (shape.to_vec(), Encoding::Int8 { scales: scales("weight_scale")?, convrot_group })
            }
            Marker::Nvfp4 => {
                let logical = vec![shape[0], shape[1] * 2];
                let block = self.get_full(&format!("{stem}.weight_scale"))?;
                if !matches!(block.stored_dtype.as_str(), "F8_E4M3" | "U8") {
                    return Err(bad(format!(
                        "`{stem}.weight_scale` is {}; NVFP4 block scales are e4m3",
                        block.stored_dtype
                    )));
                }
                let want = encoding::nvfp4_scale_bytes(logical[0], logical[1]);
                if block.bytes.len() != want || logical[1] % encoding::NVFP4_BLOCK != 0 {
                    return Err(bad(format!(
                        "`{stem}.weight_scale` has {} bytes; a [{}, {}] NVFP4 weight needs {want} (cuBLAS's 128×4 tiles)",
                        block.bytes.len(),
                        logical[0],
                        logical[1]
                    )));
                }
                let global = self.get_full(&format!("{stem}.weight_scale_2"))?.to_f32()?;
                let [global] = global[..] else {
                    return Err(bad(format!("`{stem}.weight_scale_2` must be one value, not {}", global.len())));
                };
                (logical, Encoding::Nvfp4 { block_scales: block.bytes, global })
            }
        })
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.get(name)?.shape)
    }

    /// The shape of `name`, which must have `N` dims (configs inferred from shapes index them).
    pub fn dims<const N: usize>(&self, name: &str) -> Result<[usize; N]> {
        let shape = self.get(name)?.shape;
        shape.as_slice().try_into().map_err(|_| {
            Error::config(&self.origin, format!("tensor `{name}` has shape {shape:?}; expected {N} dimensions"))
        })
    }

    /// The tensor, after checking its shape.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<RawTensor<'_>> {
        let t = self.get(name)?;
        if t.shape != expected {
            return Err(Error::WrongShape {
                path: t.path.to_path_buf(),
                key: t.name.to_string(),
                expected: expected.to_vec(),
                got: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Load a tensor of the expected shape onto a backend: plain tensors in their stored
    /// precision, quantized ones decoded into the backend's compute dtype.
    pub fn load(&self, be: &dyn Backend, name: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self.get_shaped(name, expected)?;
        let _scope = crate::backend::scope::enter(|| format!("weight `{name}` of {}", self.origin.display()));
        t.load(be)
    }

    /// Parameters and stored bytes per storage type: the dtype for plain tensors, the
    /// quantization (`Q4_K`, `nvfp4`, `fp8 e4m3 (scaled)`, ...) for the others.
    pub fn bytes_per_dtype(&self) -> Vec<(String, usize, usize)> {
        let mut by: HashMap<String, (usize, usize)> = HashMap::new();
        for name in self.keys() {
            let (kind, numel, bytes) = match self.get(name) {
                Ok(t) if t.is_dense() => (t.stored_dtype.clone(), t.numel(), t.bytes.len()),
                Ok(t) => (t.encoding.describe(), t.numel(), t.bytes.len()),
                Err(_) => ("unreadable".to_string(), 0, 0),
            };
            let e = by.entry(kind).or_default();
            // Saturating: a sum over many files must not wrap into a small, plausible number.
            e.0 = e.0.saturating_add(numel);
            e.1 = e.1.saturating_add(bytes);
        }
        let mut v: Vec<_> = by.into_iter().map(|(d, (n, b))| (d, n, b)).collect();
        v.sort();
        v
    }
}
