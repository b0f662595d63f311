//! ComfyUI's quantized checkpoints: per-layer `<layer>.comfy_quant` markers (a uint8 tensor holding
//! JSON such as `{"format": "nvfp4"}`), the `_quantization_metadata` header entry that newer files
//! carry instead, and the older scaled-fp8 files (`scale_weight`, the official fp8 releases'
//! `weight_scale`). This decides how a layer's `.weight` bytes decode; `encoding.rs` decodes them.

use std::collections::HashMap;

use serde_json::Value;

/// A layer's declared quantization.
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    /// e4m3 codes and a scalar `weight_scale`.
    Fp8E4M3,
    /// e5m2 codes and a scalar `weight_scale`.
    Fp8E5M2,
    /// Packed e2m1 pairs, e4m3 `weight_scale` per 16 values, f32 `weight_scale_2`.
    Nvfp4,
    /// int8 codes with `weight_scale` per tensor or per row, optionally ConvRot-rotated.
    Int8 { convrot_group: Option<usize> },
}

impl Marker {
    /// The safetensors dtype the marked `.weight` must have.
    pub fn storage_dtype(&self) -> &'static [&'static str] {
        match self {
            Marker::Fp8E4M3 => &["F8_E4M3"],
            Marker::Fp8E5M2 => &["F8_E5M2"],
            Marker::Nvfp4 => &["U8"],
            Marker::Int8 { .. } => &["I8"],
        }
    }
}

/// Parse a marker's JSON (from a `.comfy_quant` tensor's bytes or the header's layer table).
pub fn parse(conf: &Value) -> Result<Marker, String> {
    let Some(format) = conf.get("format").and_then(Value::as_str) else {
        return Err(format!("the quantization marker {conf} has no \"format\""));
    };
    // Settings may sit in the marker itself or in a nested "params" object (ComfyUI reads both).
    let setting = |key: &str| conf.get(key).or_else(|| conf.get("params").and_then(|p| p.get(key)));
    match format {
        "float8_e4m3fn" => Ok(Marker::Fp8E4M3),
        "float8_e5m2" => Ok(Marker::Fp8E5M2),
        "nvfp4" => Ok(Marker::Nvfp4),
        "int8_tensorwise" => {
            let convrot = setting("convrot").and_then(Value::as_bool).unwrap_or(false);
            let group = match setting("convrot_groupsize") {
                None => 256,
                Some(v) => v
                    .as_u64()
                    .and_then(|g| usize::try_from(g).ok())
                    .ok_or_else(|| format!("convrot_groupsize {v} is not a whole number"))?,
            };
            Ok(Marker::Int8 { convrot_group: convrot.then_some(group) })
        }
        other => Err(format!(
            "quantization format \"{other}\" is not supported (float8_e4m3fn, float8_e5m2, nvfp4 and int8_tensorwise are)"
        )),
    }
}

/// Parse the bytes of a `.comfy_quant` tensor.
pub fn parse_bytes(bytes: &[u8]) -> Result<Marker, String> {
    let conf: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("the `.comfy_quant` marker is not valid JSON: {e}"))?;
    parse(&conf)
}

/// Layer markers from a file's `_quantization_metadata` header entry
/// (`{"layers": {"<layer>": {"format": ...}}}`), keyed by layer name.
pub fn header_markers(metadata: &std::collections::BTreeMap<String, String>) -> Result<HashMap<String, Value>, String> {
    let Some(text) = metadata.get("_quantization_metadata") else { return Ok(HashMap::new()) };
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("`_quantization_metadata` is not valid JSON: {e}"))?;
    let Some(layers) = v.get("layers").and_then(Value::as_object) else { return Ok(HashMap::new()) };
    Ok(layers.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn markers_parse_flat_and_nested_settings() {
        assert_eq!(parse(&json!({"format": "nvfp4"})).unwrap(), Marker::Nvfp4);
        assert_eq!(parse_bytes(br#"{"format": "float8_e4m3fn"}"#).unwrap(), Marker::Fp8E4M3);
        assert_eq!(parse(&json!({"format": "int8_tensorwise"})).unwrap(), Marker::Int8 { convrot_group: None });
        assert_eq!(
            parse(&json!({"format": "int8_tensorwise", "convrot": true})).unwrap(),
            Marker::Int8 { convrot_group: Some(256) }
        );
        assert_eq!(
            parse(&json!({"format": "int8_tensorwise", "params": {"convrot": true, "convrot_groupsize": 64}})).unwrap(),
            Marker::Int8 { convrot_group: Some(64) }
        );
        let e = parse(&json!({"format": "mxfp8"})).unwrap_err();
        assert!(e.contains("mxfp8") && e.contains("not supported"), "{e}");
        assert!(parse(&json!({"convrot": true})).unwrap_err().contains("no \"format\""));
        assert!(parse_bytes(b"{not json").is_err());
    }
}
