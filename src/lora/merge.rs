//! Merging at load: `W' = W + Σ strengthᵢ·scaleᵢ·ΔWᵢ` in f32 on the host, then stored as the
//! weight would have been (bf16, fp8 codes, ...). The rounding that storage adds to the merged
//! weight is measured, so the log can say what the merge cost in precision.

use super::AdapterSet;
use crate::dtype::{round_through, DType};

/// The largest relative error storage added to a merged weight, over every merged weight.
#[derive(Debug, Clone, Default)]
pub struct MergeStats {
    pub tensors: usize,
    /// max |stored − exact| / max |exact| of the worst tensor.
    pub max_rel_err: f32,
    /// What the worst tensor was stored as.
    pub worst: String,
}

/// Merge the adapters of `names` (each `[rows, cols]`, concatenated row-wise) into `values`.
pub fn merge_into(set: &AdapterSet, names: &[&str], rows: usize, cols: usize, values: &mut [f32]) {
    for (i, name) in names.iter().enumerate() {
        set.add_to(name, &mut values[i * rows * cols..(i + 1) * rows * cols], cols);
    }
}

/// Max |stored − exact| / max |exact| (0 for an all-zero weight).
pub fn relative_error(exact: &[f32], stored: &[f32]) -> f32 {
    let top = exact.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = exact.iter().zip(stored).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if top > 0.0 {
        err / top
    } else {
        err
    }
}

impl AdapterSet {
    /// Add `Σ strength·scale·ΔW` to `values`, the rows of diffusers weight `name` (`[rows, cols]`).
    pub fn add_to(&self, name: &str, values: &mut [f32], cols: usize) {
        for &(e, p) in self.by_tensor.get(name).into_iter().flatten() {
            let entry = &self.entries[e];
            let part = &entry.parts[p];
            let src = part.at..part.at + part.rows.len();
            let delta = entry.delta.rows(src, entry.strength);
            for (w, d) in values[part.rows.start * cols..part.rows.end * cols].iter_mut().zip(delta) {
                *w += d;
            }
        }
    }

    /// Record the storage error of one merged weight (`what`: its names and storage format).
    pub fn record_merge(&self, exact: &[f32], stored: &[f32], what: impl FnOnce() -> String) {
        let e = relative_error(exact, stored);
        let mut s = self.merge_stats.lock().unwrap_or_else(|p| p.into_inner());
        s.tensors += 1;
        if e >= s.max_rel_err {
            s.max_rel_err = e;
            s.worst = what();
        }
    }

    /// Round merged values through `dtype` (as the weight is stored) and record the error.
    pub fn round_merged(&self, values: &mut [f32], dtype: DType, names: &[&str]) {
        let exact = values.to_vec();
        round_through(values, dtype);
        self.record_merge(&exact, values, || format!("{} as {}", names.join(" + "), dtype.name()));
    }

    pub fn merge_stats(&self) -> MergeStats {
        self.merge_stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Log what merging cost in precision.
    pub fn log_merge(&self) {
        let s = self.merge_stats();
        if s.tensors > 0 {
            tracing::info!(
                "LoRA merged into {} weights; storing them added at most {:.3e} relative error ({})",
                s.tensors,
                s.max_rel_err,
                s.worst
            );
        }
    }
}
