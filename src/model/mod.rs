//! Model components, each written once against the op layer.

pub mod linear;
pub mod qwen3;
pub mod rope;
pub mod tokenizer;
pub mod transformer;
pub mod vae;

/// A component's folder: `path/<name>` when `path` is a pipeline folder that has one, else `path`.
pub fn component_dir(path: &std::path::Path, name: &str) -> std::path::PathBuf {
    let sub = path.join(name);
    if sub.is_dir() {
        sub
    } else {
        path.to_path_buf()
    }
}

/// A float setting of a config that must be a positive, finite number (NaN, infinity, zero and
/// negative values would only show up later, as a black or noisy image).
pub fn positive_finite(name: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{name} must be a positive finite number, not {v}"))
    }
}
