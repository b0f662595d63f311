//! Module names -> our transformer's weights. Every linear is known under its diffusers name and
//! its BFL name (from `layout::bfl_tensors`, which says which diffusers rows a BFL tensor is made
//! of: fused qkv = q, k, v thirds; the final adaLN with shift and scale swapped), each also with
//! dots as underscores for kohya-style names. Names are resolved against this list, never guessed.

use std::collections::HashMap;
use std::ops::Range;

use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::layout::{bfl_tensors, diffusers_tensors};

/// Rows `rows` of diffusers weight `tensor` receive rows `at..at + rows.len()` of the delta.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub tensor: String,
    pub rows: Range<usize>,
    pub at: usize,
}

/// A linear a LoRA module may adapt: its delta's shape and where the delta's rows go.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub out_features: usize,
    pub in_features: usize,
    pub parts: Vec<Part>,
}

/// Every adaptable linear of one transformer config, by every name it is known under.
pub struct ModuleTable {
    dotted: HashMap<String, Target>,
    underscored: HashMap<String, Target>,
}

impl ModuleTable {
    pub fn new(cfg: &TransformerConfig) -> ModuleTable {
        let mut dotted = HashMap::new();
        for t in diffusers_tensors(cfg) {
            if let (&[out, inp], Some(stem)) = (&t.shape[..], t.name.strip_suffix(".weight")) {
                let parts = vec![Part { tensor: t.name.clone(), rows: 0..out, at: 0 }];
                dotted.insert(stem.to_string(), Target { out_features: out, in_features: inp, parts });
            }
        }
        for (t, pieces) in bfl_tensors(cfg) {
            if let (&[out, inp], Some(stem)) = (&t.shape[..], t.name.strip_suffix(".weight")) {
                let mut at = 0;
                let parts = pieces
                    .into_iter()
                    .map(|p| {
                        let part = Part { tensor: p.name, rows: p.rows.clone(), at };
                        at += p.rows.len();
                        part
                    })
                    .collect();
                dotted.insert(stem.to_string(), Target { out_features: out, in_features: inp, parts });
            }
        }
        let underscored = dotted.iter().map(|(k, v)| (k.replace('.', "_"), v.clone())).collect();
        ModuleTable { dotted, underscored }
    }

    /// The linear a module path names (`kohya`: dots written as underscores).
    pub fn resolve(&self, path: &str, kohya: bool) -> Option<&Target> {
        if kohya {
            self.underscored.get(path).or_else(|| self.dotted.get(path))
        } else {
            self.dotted.get(path)
        }
    }
}

/// Which block a module path (any naming) belongs to, for `inspect`: ("double", i), ("single",
/// i), or None for the embedders, modulation and output layers.
pub fn block_of(path: &str) -> Option<(&'static str, usize)> {
    // "single_transformer_blocks" contains "transformer_blocks": test the single names first.
    for (marker, kind) in [
        ("single_transformer_blocks", "single"),
        ("single_blocks", "single"),
        ("double_blocks", "double"),
        ("transformer_blocks", "double"),
    ] {
        if let Some(at) = path.find(marker) {
            let rest = &path[at + marker.len()..];
            let digits: String =
                rest.trim_start_matches(['.', '_']).chars().take_while(|c| c.is_ascii_digit()).collect();
            return digits.parse().ok().map(|i| (kind, i));
        }
    }
    None
}
