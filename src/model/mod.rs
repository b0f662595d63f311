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

/// The largest width any config dimension may have (hidden sizes, channels, vocabularies): far
/// above any real model, low enough that every size the planner multiplies fits in 64 bits.
pub const MAX_DIM: usize = 1 << 24;

/// Dimensions that must be positive and at most [`MAX_DIM`].
pub fn bounded_dims(dims: &[(&str, usize)]) -> Result<(), String> {
    for (name, v) in dims {
        if *v == 0 || *v > MAX_DIM {
            return Err(format!("{name} is {v}; it must be between 1 and {MAX_DIM}"));
        }
    }
    Ok(())
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
