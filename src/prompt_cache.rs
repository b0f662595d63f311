//! On-disk cache of prompt embeddings, keyed by a hash of the encoder's identity (safetensors
//! headers, sizes and sampled bytes of every weight file, the tokenizer, the precision and compute
//! dtype), the template and the prompt. Entries are written to a temporary file and renamed into
//! place (safe with concurrent runs), validated on read (a corrupt entry is removed and
//! recomputed), and the folder is trimmed to a size bound, least recently used first.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::safetensors::{write_safetensors, TensorEntry};
use crate::weights::WeightStore;

/// Default bound of the cache folder.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

pub struct PromptCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Hash of everything but the prompt.
    identity: [u8; 32],
    /// The shape and stored dtype every entry must have (see [`PromptCache::expecting`]).
    expected: Option<(Vec<usize>, DType)>,
}

/// FLUX2_CACHE_DIR, else XDG_CACHE_HOME/flux2, else ~/.cache/flux2.
pub fn default_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("FLUX2_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join("flux2")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/flux2")))
        .unwrap_or_else(|| PathBuf::from(".flux2-cache"))
        .join("prompt-embeds")
}

/// Hash the identity of every file of a model folder: name, size, the safetensors header and
/// 64 KiB sampled from the start, middle and end.
fn hash_folder(h: &mut Sha256, dir: &Path) -> Result<()> {
    // A single weights file (split-file setups) stands for itself.
    let mut files: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect()
    };
    files.sort();
    for p in files {
        let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        h.update(p.file_name().unwrap().as_encoded_bytes());
        h.update(len.to_le_bytes());
        for at in [0, len / 2, len.saturating_sub(21_846)] {
            let mut buf = vec![0u8; 21_846.min(len as usize)];
            f.seek(SeekFrom::Start(at)).map_err(|e| Error::io(&p, e))?;
            let n = f.read(&mut buf).map_err(|e| Error::io(&p, e))?;
            h.update(&buf[..n]);
        }
    }
    Ok(())
}

impl PromptCache {
    /// A cache for the encoder in `text_encoder_dir` with tokenizer `tokenizer_dir`; `settings`
    /// names everything else that changes the result (precision, compute dtype, template, layers).
    pub fn new(
        dir: PathBuf,
        max_bytes: u64,
        text_encoder_dir: &Path,
        tokenizer_dir: Option<&Path>,
        settings: &str,
    ) -> Result<PromptCache> {
        let mut h = Sha256::new();
        h.update(b"flux2 prompt cache v1\0");
        hash_folder(&mut h, text_encoder_dir)?;
        match tokenizer_dir {
            Some(dir) => hash_folder(&mut h, dir)?,
            None => h.update(include_bytes!("../assets/qwen3-tokenizer/tokenizer.json.gz")),
        }
        h.update(settings.as_bytes());
        Ok(PromptCache { dir, max_bytes, identity: h.finalize().into(), expected: None })
    }

    /// Accept only entries of this shape and stored dtype: an entry from another build or a
    /// damaged file is deleted on read (with a warning) instead of failing the run later.
    pub fn expecting(self, shape: &[usize], dtype: DType) -> PromptCache {
        PromptCache { expected: Some((shape.to_vec(), dtype)), ..self }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, prompt: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.identity);
        h.update(prompt.as_bytes());
        let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{key}.safetensors"))
    }

    /// The cached embedding of `prompt`, if present and intact (a damaged entry is removed).
    pub fn get(&self, prompt: &str) -> Option<Tensor> {
        let path = self.path(prompt);
        if !path.is_file() {
            return None;
        }
        let read = || -> Result<Tensor> {
            let store = WeightStore::open(&path)?;
            let t = store.get("prompt_embeds")?;
            let values = t.to_f32()?;
            let stored_prompt = store.files()[0].metadata().get("prompt").cloned().unwrap_or_default();
            if stored_prompt != prompt {
                return Err(Error::Other("it holds another prompt".into()));
            }
            if let Some((shape, dtype)) = &self.expected {
                if t.shape() != shape.as_slice() || t.dtype()? != *dtype {
                    return Err(Error::Other(format!(
                        "it holds {:?} {}, this model needs {shape:?} {dtype}",
                        t.shape(),
                        t.dtype()?
                    )));
                }
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(Error::Other("it holds NaN or inf".into()));
            }
            Tensor::from_f32(values, t.shape())
        };
        match read() {
            Ok(t) => {
                // Touch it, so trimming removes the least recently used entries first.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(t)
            }
            Err(e) => {
                tracing::warn!(
                    "prompt cache {}: entry {} is unusable ({e}); deleted, recomputing",
                    self.dir.display(),
                    path.file_name().unwrap_or_default().to_string_lossy()
                );
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Store an embedding (values as `dtype`) atomically, then trim the folder.
    pub fn put(&self, prompt: &str, embeds: &Tensor, dtype: DType) -> Result<()> {
        let path = self.path(prompt);
        let values = embeds.to_vec_f32()?;
        let meta = std::collections::BTreeMap::from([("prompt".to_string(), prompt.to_string())]);
        // Atomic (a temporary file renamed into place), so concurrent runs never see half an entry.
        write_safetensors(&path, vec![TensorEntry::from_f32("prompt_embeds", &values, embeds.shape(), dtype)], &meta)?;
        self.trim();
        Ok(())
    }

    /// Remove least recently used entries until the folder is within its bound.
    fn trim(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let name = e.file_name();
                let entry = m.is_file() && name.to_string_lossy().ends_with(".safetensors");
                entry.then_some(())?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}
