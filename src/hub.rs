//! Resolve a Hugging Face repo id (`org/name`) to a snapshot in the local cache, without any
//! network access. The cache root follows huggingface_hub: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
//! HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, then ~/.cache/huggingface/hub.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub fn cache_root() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join("huggingface/hub")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/huggingface/hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

/// `org/name` with the characters Hugging Face allows.
pub fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    // Hugging Face names: letters, digits, '-', '_', '.', starting and ending with a letter or digit.
    let ok = |p: &str| {
        p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && p.starts_with(|c: char| c.is_ascii_alphanumeric())
            && p.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if ok(a) && ok(b))
}

/// A local folder as given, or the cached snapshot of a repo id.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(spec) {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    }
    let root = cache_root();
    let repo = root.join(format!("models--{}", spec.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    let pinned = std::fs::read_to_string(repo.join("refs/main")).ok().map(|r| snapshots.join(r.trim()));
    let snapshot = match pinned.filter(|p| p.is_dir()) {
        Some(p) => Some(p),
        None => newest_dir(&snapshots),
    };
    match snapshot {
        Some(s) if s.join("model_index.json").is_file() => Ok(s),
        _ => Err(Error::Other(format!(
            "model `{spec}` is not a local folder and is not in the Hugging Face cache ({}).\n\
             Download it first (it needs the diffusers layout: model_index.json, tokenizer/, text_encoder/, \
             transformer/, vae/, scheduler/):\n    hf download {spec}\n\
             (or `huggingface-cli download {spec}`; gated repos need `hf auth login` first). \
             Set HF_HUB_CACHE or HF_HOME if your cache lives elsewhere.",
            root.display()
        ))),
    }
}

fn newest_dir(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("black-forest-labs/FLUX.2-klein-4B"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("./local"));
        assert!(!looks_like_repo_id("noslash"));
    }
}
