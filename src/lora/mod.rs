//! LoRA, LoKr and LoHa adapters for the transformer (`--lora FILE[:SCALE]`).
//!
//! - `keys`: a file's keys sorted into modules, the trainer's format detected from them.
//! - `names`: module names (diffusers, BFL, kohya) resolved onto the transformer's weights.
//! - `delta`: each module's ΔW from its factors, scaled as its trainer defines.
//! - `merge`: `W + Σ scaleᵢ·ΔWᵢ` on the host at load, with the storage rounding error.
//! - `runtime`: the unmerged path, `y + (x·Aᵀ)·Bᵀ` per linear, over the backend's ops.
//! - `inspect`: what `flux2 inspect` says about a LoRA file.

pub mod delta;
pub mod inspect;
pub mod keys;
pub mod merge;
pub mod names;
pub mod runtime;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use self::delta::Delta;
use self::keys::{list_some, Naming, ParsedKeys};
use self::names::{ModuleTable, Part};
use crate::error::{Error, Result};
use crate::model::transformer::config::TransformerConfig;
use crate::weights::WeightStore;

/// One `--lora FILE[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f32,
}

impl LoraSpec {
    /// `FILE` or `FILE:SCALE`. Only the last colon splits, and only when a number follows, so
    /// Windows paths (`C:\x.safetensors`) stay whole.
    pub fn parse(s: &str) -> Result<LoraSpec> {
        let (path, scale) = match s.rsplit_once(':') {
            Some((p, n)) if !p.is_empty() && n.trim().parse::<f32>().is_ok() => (p, n.trim().parse::<f32>().unwrap()),
            _ => (s, 1.0),
        };
        if !scale.is_finite() {
            return Err(Error::InvalidArgument(format!("--lora {s}: the scale must be a finite number")));
        }
        if path.is_empty() {
            return Err(Error::InvalidArgument("--lora needs a file".into()));
        }
        Ok(LoraSpec { path: PathBuf::from(path), scale })
    }
}

/// Whether adapters are merged into the weights at load or applied at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum LoraMode {
    /// W' = W + Σ scale·ΔW at load: no run-time cost.
    #[default]
    Merge,
    /// The base weights stay as stored; each adapted linear adds `(x·Aᵀ)·Bᵀ` (switchable).
    Runtime,
}

/// The adapters a transformer loads with.
#[derive(Debug, Clone, Default)]
pub struct LoraOptions {
    pub loras: Vec<LoraSpec>,
    pub mode: LoraMode,
}

/// What a PEFT adapter config says about scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeftConfig {
    pub alpha: f32,
    /// rsLoRA: scale `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
}

/// An opened LoRA file with its keys parsed.
pub struct LoraFile {
    pub path: PathBuf,
    pub store: WeightStore,
    pub keys: ParsedKeys,
}

impl LoraFile {
    pub fn open(path: &Path) -> Result<LoraFile> {
        let store = WeightStore::open(path)?;
        let keys = keys::parse(&store)?;
        Ok(LoraFile { path: path.to_path_buf(), store, keys })
    }

    /// PEFT's adapter config, which diffusers stores in the file's metadata
    /// (`lora_adapter_metadata`): PEFT scales by `lora_alpha / r` (`/ √r` with rsLoRA), r being
    /// each module's rank, which the factors' shapes give (so a `rank_pattern` needs no reading).
    pub fn peft_config(&self) -> Result<Option<PeftConfig>> {
        let Some(meta) = self.store.files().iter().find_map(|f| f.metadata().get("lora_adapter_metadata")) else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(meta)
            .map_err(|e| Error::config(&self.path, format!("lora_adapter_metadata is not JSON: {e}")))?;
        // diffusers' pipelines store the transformer's config under `transformer.`-prefixed keys.
        let get = |k: &str| v.get(format!("transformer.{k}")).or_else(|| v.get(k));
        // Per-module alphas match module names by PEFT's pattern rules: refuse rather than scale
        // some modules wrongly.
        if get("alpha_pattern").and_then(|p| p.as_object()).is_some_and(|p| !p.is_empty()) {
            return Err(Error::Unsupported(format!(
                "{}: the adapter config has an `alpha_pattern` (per-module alphas), which is not supported",
                self.path.display()
            )));
        }
        let Some(alpha) = get("lora_alpha").and_then(|a| a.as_f64()) else { return Ok(None) };
        Ok(Some(PeftConfig { alpha: alpha as f32, rslora: get("use_rslora").and_then(|b| b.as_bool()) == Some(true) }))
    }
}

/// One module of one file, resolved onto the transformer.
struct Entry {
    delta: Delta,
    /// The user's strength for its file.
    strength: f32,
    parts: Vec<Part>,
}

/// Every adapter of a run, resolved against one transformer config.
pub struct AdapterSet {
    entries: Vec<Entry>,
    /// Diffusers weight name -> (entry, part index).
    by_tensor: HashMap<String, Vec<(usize, usize)>>,
    /// The largest storage rounding error a merge added (relative to the weight's max).
    pub(crate) merge_stats: std::sync::Mutex<merge::MergeStats>,
}

impl AdapterSet {
    /// Open every file and resolve it. Errors: text-encoder keys, unsupported or unknown keys,
    /// modules that match no linear, factors whose shapes do not fit.
    pub fn load(specs: &[LoraSpec], cfg: &TransformerConfig) -> Result<AdapterSet> {
        let files = specs.iter().map(|s| LoraFile::open(&s.path)).collect::<Result<Vec<_>>>()?;
        AdapterSet::resolve(&files, specs, cfg)
    }

    pub fn resolve(files: &[LoraFile], specs: &[LoraSpec], cfg: &TransformerConfig) -> Result<AdapterSet> {
        let table = ModuleTable::new(cfg);
        let mut entries = Vec::new();
        for (file, spec) in files.iter().zip(specs) {
            check_keys(file)?;
            let peft = file.peft_config()?;
            let mut unmatched = Vec::new();
            let mut count = 0;
            for m in &file.keys.modules {
                let Some(target) = table.resolve(&m.path, m.naming == Naming::Kohya) else {
                    unmatched.push(m.tensors.values().next().cloned().unwrap_or_default());
                    continue;
                };
                let delta = Delta::read(&file.store, m, &m.path, target.out_features, target.in_features, peft)?;
                entries.push(Entry { delta, strength: spec.scale, parts: target.parts.clone() });
                count += 1;
            }
            if !unmatched.is_empty() {
                return Err(Error::config(
                    &file.path,
                    format!(
                        "{} LoRA module(s) match no linear of this transformer (a LoRA for another model?){}",
                        unmatched.len(),
                        list_some(&unmatched)
                    ),
                ));
            }
            tracing::info!(
                "LoRA {} ({}): {count} modules at strength {}",
                file.path.display(),
                file.keys.describe(),
                spec.scale
            );
        }
        let mut by_tensor: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        for (e, entry) in entries.iter().enumerate() {
            for (p, part) in entry.parts.iter().enumerate() {
                by_tensor.entry(part.tensor.clone()).or_default().push((e, p));
            }
        }
        Ok(AdapterSet { entries, by_tensor, merge_stats: Default::default() })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any adapter changes one of these diffusers weights.
    pub fn touches(&self, names: &[&str]) -> bool {
        names.iter().any(|n| self.by_tensor.contains_key(*n))
    }
}

/// Refuse what cannot be applied exactly, naming the keys.
fn check_keys(file: &LoraFile) -> Result<()> {
    let k = &file.keys;
    if !k.text_encoder.is_empty() {
        return Err(Error::Unsupported(format!(
            "{}: {} text-encoder LoRA key(s); only transformer LoRAs are applied (remove them from the file){}",
            file.path.display(),
            k.text_encoder.len(),
            list_some(&k.text_encoder)
        )));
    }
    if let Some((_, why)) = k.unsupported.first() {
        let keys: Vec<String> = k.unsupported.iter().map(|(key, _)| key.clone()).collect();
        return Err(Error::Unsupported(format!("{}: {why}{}", file.path.display(), list_some(&keys))));
    }
    if !k.unknown.is_empty() {
        return Err(Error::config(
            &file.path,
            format!("{} key(s) are no LoRA tensor this loader knows{}", k.unknown.len(), list_some(&k.unknown)),
        ));
    }
    Ok(())
}
