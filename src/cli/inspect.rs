//! `flux2 inspect PATH`: what a checkpoint is (layout, config), its parameter count and bytes per
//! dtype. PATH may be a pipeline folder, a component folder or a single file.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::weights::WeightStore;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Pipeline folder, component folder, or .safetensors file.
    pub path: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let report = inspect(&args.path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print_text(&report, 0);
    }
    Ok(())
}

/// The report as JSON: `{kind, ...}`; pipelines hold one report per component.
pub fn inspect(path: &Path) -> Result<Value> {
    if path.is_dir() && path.join("model_index.json").is_file() {
        let index_path = path.join("model_index.json");
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&index_path, format!("not valid JSON: {e}")))?;
        let mut components = serde_json::Map::new();
        let mut entries: Vec<_> =
            index.as_object().into_iter().flatten().filter(|(k, _)| !k.starts_with('_')).collect();
        entries.sort_by_key(|(k, _)| k.as_str());
        for (name, value) in entries {
            let dir = path.join(name);
            if !value.is_array() || !dir.is_dir() {
                continue;
            }
            let has_weights = has_safetensors(&dir)?;
            let class = value.get(1).and_then(Value::as_str).unwrap_or("?");
            components.insert(name.clone(), if has_weights { component(&dir, name)? } else { json!({"kind": class}) });
        }
        return Ok(json!({
            "kind": "pipeline",
            "path": path.display().to_string(),
            "class": index.get("_class_name"),
            "is_distilled": index.get("is_distilled").and_then(Value::as_bool).unwrap_or(false),
            "components": components,
        }));
    }
    // A folder that only holds `transformer/` (what `synth --layout diffusers` writes).
    if path.is_dir() && !has_safetensors(path)? && path.join("transformer").is_dir() {
        return component(&path.join("transformer"), "transformer");
    }
    if path.is_file() && crate::weights::gguf::GgufFile::is_gguf(path) {
        let mut report = gguf_report(path)?;
        if let Some(found) = identify(path) {
            report.as_object_mut().unwrap().extend(found);
        }
        return Ok(report);
    }
    if path.is_file() {
        if let Some(report) = crate::lora::inspect::report(path)? {
            return Ok(report);
        }
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    component(path, &name)
}

/// A GGUF file: version, architecture, tensors and bytes per GGML type, what it holds.
fn gguf_report(path: &Path) -> Result<Value> {
    let f = crate::weights::gguf::GgufFile::open(path)?;
    let mut by_type: std::collections::BTreeMap<String, (usize, usize, usize)> = Default::default();
    let mut parameters = 0usize;
    for t in f.tensors() {
        let e = by_type.entry(crate::weights::ggml::GgmlType::name_of_id(t.type_id)).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(t.numel());
        e.2 = e.2.saturating_add(t.end - t.start);
        parameters = parameters.saturating_add(t.numel());
    }
    let unsupported: Vec<&str> =
        f.tensors().iter().filter(|t| t.ggml_type().is_none()).map(|t| t.name.as_str()).collect();
    let names = f.tensors().iter().map(|t| t.name.as_str());
    let holds = if names.clone().any(|n| n.starts_with("double_blocks.") || n.starts_with("single_blocks.")) {
        "FLUX transformer (BFL names)"
    } else if names.clone().any(|n| n.starts_with("blk.")) {
        "text encoder (llama.cpp names)"
    } else {
        "unknown"
    };
    Ok(json!({
        "kind": "gguf",
        "path": path.display().to_string(),
        "version": f.version,
        "architecture": f.metadata.get("general.architecture"),
        "holds": holds,
        "tensors": f.tensors().len(),
        "parameters": parameters,
        "types": by_type.iter().map(|(ty, (n, p, b))| json!({"type": ty, "tensors": n, "parameters": p, "bytes": b})).collect::<Vec<_>>(),
        "unsupported_tensors": unsupported,
        "metadata_keys": f.metadata.len(),
    }))
}

fn has_safetensors(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .any(|e| e.path().to_string_lossy().ends_with(".safetensors")))
}

fn component(path: &Path, name: &str) -> Result<Value> {
    let store = WeightStore::open(path)?;
    let mut report = weights_summary(&store);
    let obj = report.as_object_mut().unwrap();
    obj.insert("path".into(), path.display().to_string().into());
    if let Some(found) = identify(path) {
        obj.extend(found);
        return Ok(report);
    }
    obj.insert("kind".into(), if name.is_empty() { "weights".into() } else { name.into() });
    let config_path = if path.is_dir() { Some(path.join("config.json")).filter(|p| p.is_file()) } else { None };
    if let Some(p) = config_path {
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            obj.insert("config".into(), v);
        }
    }
    Ok(report)
}

/// Which klein component a folder or file holds, with its layout and config (read the way
/// loading reads them), or None if it is none of them.
fn identify(path: &Path) -> Option<serde_json::Map<String, Value>> {
    let mut out = serde_json::Map::new();
    if let Ok((_, layout, cfg)) = crate::model::transformer::open(path) {
        out.insert("kind".into(), "transformer".into());
        out.insert("layout".into(), layout.name().into());
        out.insert("config".into(), serde_json::to_value(&cfg).unwrap());
    } else if let Ok((_, cfg)) = crate::model::qwen3::open(path) {
        out.insert("kind".into(), "text_encoder".into());
        out.insert("config".into(), serde_json::to_value(&cfg).unwrap());
    } else if let Ok((_, layout, cfg)) = crate::model::vae::open(path) {
        out.insert("kind".into(), "vae".into());
        out.insert("layout".into(), format!("{layout:?}").to_lowercase().into());
        out.insert("config".into(), serde_json::to_value(&cfg).unwrap());
    } else {
        return None;
    }
    Some(out)
}

fn weights_summary(store: &WeightStore) -> Value {
    let per_dtype = store.bytes_per_dtype();
    let params = per_dtype.iter().fold(0usize, |a, (_, n, _)| a.saturating_add(*n));
    let bytes = per_dtype.iter().fold(0usize, |a, (_, _, b)| a.saturating_add(*b));
    json!({
        "files": store.file_count(),
        "tensors": store.len(),
        "parameters": params,
        "bytes": bytes,
        "dtypes": per_dtype.iter().map(|(d, n, b)| json!({"dtype": d, "parameters": n, "bytes": b})).collect::<Vec<_>>(),
    })
}

fn human(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_text(v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    let Some(obj) = v.as_object() else { return };
    for (k, val) in obj {
        match (k.as_str(), val) {
            ("components", Value::Object(cs)) => {
                for (name, c) in cs {
                    println!("{pad}{name}:");
                    print_text(c, indent + 2);
                }
            }
            ("dtypes", Value::Array(ds)) => {
                for d in ds {
                    println!(
                        "{pad}  {:<8} {:>16} params {:>18} bytes",
                        d["dtype"].as_str().unwrap_or("?"),
                        human(d["parameters"].as_u64().unwrap_or(0)),
                        human(d["bytes"].as_u64().unwrap_or(0))
                    );
                }
            }
            ("parameters" | "bytes", Value::Number(n)) => {
                println!("{pad}{k}: {}", human(n.as_u64().unwrap_or(0)))
            }
            (_, Value::Object(_)) => println!("{pad}{k}: {}", serde_json::to_string(val).unwrap()),
            (_, Value::String(s)) => println!("{pad}{k}: {s}"),
            _ => println!("{pad}{k}: {val}"),
        }
    }
}
