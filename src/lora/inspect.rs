//! What `flux2 inspect FILE` reports for a LoRA file: format, ranks, alphas, targets, blocks,
//! text-encoder keys. Needs no model: names are read, not resolved.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use super::keys::{self, Algo, Module};
use super::names::block_of;
use super::LoraFile;
use crate::error::Result;
use crate::weights::WeightStore;

/// Whether a store's keys look like an adapter file (any LoRA/LoKr/LoHa tensor name).
pub fn looks_like_lora(store: &WeightStore) -> bool {
    store.keys().any(|k| k.contains(".lora_") || k.contains(".lora.") || k.contains(".lokr_") || k.contains(".hada_"))
}

/// The rank of one module: rows of the down factor (LoRA, LoHa), the LoKr factor rank (0: full).
fn rank_of(store: &WeightStore, m: &Module) -> Option<usize> {
    let dim = |role: &str, axis: usize| -> Option<usize> {
        m.tensors.get(role).and_then(|k| store.get(k).ok()).and_then(|t| t.shape().get(axis).copied())
    };
    match m.algo {
        Algo::Lora => dim("down", 0),
        Algo::LoHa => dim("hada_w1_b", 0),
        Algo::LoKr => dim("w1_a", 1).or_else(|| dim("w2_a", 1)).or(Some(0)),
    }
}

/// The report, or None when the file is no adapter file.
pub fn report(path: &Path) -> Result<Option<Value>> {
    let store = WeightStore::open(path)?;
    if !looks_like_lora(&store) {
        return Ok(None);
    }
    drop(store);
    let file = LoraFile::open(path)?;
    let (store, k) = (&file.store, &file.keys);
    let mut ranks = BTreeSet::new();
    let mut alphas = BTreeSet::new();
    let (mut double, mut single, mut other) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for m in &k.modules {
        if let Some(r) = rank_of(store, m) {
            ranks.insert(r);
        }
        if let Some(a) = m.tensors.get("alpha").and_then(|key| store.get(key).ok()).and_then(|t| t.to_f32().ok()) {
            if let Some(a) = a.first() {
                alphas.insert(a.to_string());
            }
        }
        match block_of(&m.path) {
            Some(("double", i)) => {
                double.insert(i);
            }
            Some((_, i)) => {
                single.insert(i);
            }
            None => {
                other.insert(m.path.clone());
            }
        }
    }
    let peft = file.peft_config().ok().flatten();
    Ok(Some(json!({
        "kind": "lora",
        "path": path.display().to_string(),
        "format": k.describe(),
        "targets": k.modules.len(),
        "ranks": ranks.into_iter().collect::<Vec<_>>(),
        "alphas": alphas.into_iter().collect::<Vec<_>>(),
        "peft_lora_alpha": peft.map(|p| p.alpha),
        "peft_rslora": peft.map(|p| p.rslora),
        "double_blocks": double.into_iter().collect::<Vec<_>>(),
        "single_blocks": single.into_iter().collect::<Vec<_>>(),
        "other_targets": other.into_iter().collect::<Vec<_>>(),
        "text_encoder_keys": k.text_encoder.len(),
        "text_encoder_examples": k.text_encoder.iter().take(4).collect::<Vec<_>>(),
        "unsupported_keys": k.unsupported.iter().map(|(key, why)| format!("{key}: {why}")).collect::<Vec<_>>(),
        "unknown_keys": k.unknown.len(),
        "unknown_examples": keys::list_some(&k.unknown).trim_start_matches(": ").to_string(),
    })))
}
