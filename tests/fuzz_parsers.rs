//! Random and mutated inputs for the parsers that read untrusted files: safetensors headers and
//! the component configs. Every input must give Ok or a clean `Err`, never a panic, and an
//! accepted checkpoint must be internally consistent. Case counts keep the whole file to a few
//! seconds on 2 cores.

use std::collections::BTreeMap;
use std::path::Path;

use flux2::model::qwen3::Qwen3Config;
use flux2::model::transformer::config::TransformerConfig;
use flux2::model::transformer::layout::Layout;
use flux2::model::vae::VaeConfig;
use flux2::sampler::SchedulerConfig;
use flux2::weights::safetensors::{dtype_bits, write_safetensors, SafetensorsFile, TensorEntry};
use flux2::DType;
use proptest::prelude::*;
use serde_json::{json, Value};

fn config() -> ProptestConfig {
    // No regression files in the source tree: a failure prints its minimal input instead.
    ProptestConfig { cases: 192, failure_persistence: None, ..ProptestConfig::default() }
}

/// A valid file image: a few tensors of random shapes and storage dtypes.
fn valid_file(dir: &Path, tensors: &[(Vec<usize>, u8)]) -> Vec<u8> {
    let dtypes = [DType::F32, DType::BF16, DType::F16, DType::F8E4M3];
    let values: Vec<Vec<f32>> = tensors.iter().map(|(s, _)| vec![0.5; s.iter().product()]).collect();
    let entries = tensors
        .iter()
        .zip(&values)
        .enumerate()
        .map(|(i, ((shape, d), v))| TensorEntry::from_f32(&format!("t{i}"), v, shape, dtypes[*d as usize % 4]))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let p = dir.join("valid.safetensors");
    write_safetensors(&p, entries, &meta).unwrap();
    std::fs::read(&p).unwrap()
}

/// Open `bytes` as a file; whatever it holds, the result is Ok or Err, and an accepted file's
/// tensors lie inside it with exactly the bytes their shape needs.
fn open_checked(dir: &Path, bytes: &[u8]) {
    let p = dir.join("case.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let Ok(file) = SafetensorsFile::open(&p) else { return };
    let mut covered = 0usize;
    for info in file.tensors().values() {
        let data = file.bytes(info);
        let bits = dtype_bits(&info.dtype).expect("accepted dtype");
        assert_eq!(data.len() * 8, info.numel() * bits, "{info:?}");
        covered += data.len();
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(covered, bytes.len() - 8 - header_len, "the tensors tile the data region");
}

/// Numbers that break naive arithmetic.
fn nasty_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        Just(1 << 32),
        Just(1 << 59),
        Just(1 << 62),
        Just(u64::MAX),
        Just(u64::MAX / 2 + 1),
        any::<u64>(),
    ]
}

/// One edit of a header's JSON (as a map of entries).
#[derive(Debug, Clone)]
enum HeaderEdit {
    Offsets(usize, u64, u64),
    Shape(usize, Vec<u64>),
    Dtype(usize, String),
    Remove(usize, &'static str),
    Duplicate(usize),
    Value(usize, Value),
}

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    let idx = 0usize..4;
    prop_oneof![
        (idx.clone(), nasty_number(), nasty_number()).prop_map(|(i, a, b)| HeaderEdit::Offsets(i, a, b)),
        (idx.clone(), prop::collection::vec(nasty_number(), 0..4)).prop_map(|(i, s)| HeaderEdit::Shape(i, s)),
        (idx.clone(), prop_oneof![Just("F4".to_string()), Just("I64".to_string()), "[A-Z0-9_]{0,8}"])
            .prop_map(|(i, d)| HeaderEdit::Dtype(i, d)),
        (idx.clone(), prop_oneof![Just("dtype"), Just("shape"), Just("data_offsets")])
            .prop_map(|(i, k)| HeaderEdit::Remove(i, k)),
        idx.clone().prop_map(HeaderEdit::Duplicate),
        (idx, json_value()).prop_map(|(i, v)| HeaderEdit::Value(i, v)),
    ]
}

/// The entry `name`, made an object first if missing or replaced by an earlier edit.
fn slot(header: &mut serde_json::Map<String, Value>, name: String) -> &mut Value {
    let v = header.entry(name).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v
}

/// Apply `edits` to the header of `file` (re-serialised; a duplicate is spliced in as text,
/// which a JSON map could not hold).
fn edit_header(file: &[u8], edits: &[HeaderEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let data = &file[8 + n..];
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let names: Vec<String> = header.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let mut duplicate = None;
    for edit in edits {
        let name = |i: &usize| names.get(*i % names.len().max(1)).cloned().unwrap_or_else(|| "x".into());
        match edit {
            HeaderEdit::Offsets(i, a, b) => slot(&mut header, name(i))["data_offsets"] = json!([a, b]),
            HeaderEdit::Shape(i, s) => slot(&mut header, name(i))["shape"] = json!(s),
            HeaderEdit::Dtype(i, d) => slot(&mut header, name(i))["dtype"] = json!(d),
            HeaderEdit::Remove(i, k) => {
                if let Some(o) = header.get_mut(&name(i)).and_then(Value::as_object_mut) {
                    o.remove(*k);
                }
            }
            HeaderEdit::Duplicate(i) => duplicate = Some(name(i)),
            HeaderEdit::Value(i, v) => {
                header.insert(name(i), v.clone());
            }
        }
    }
    let mut text = Value::Object(header).to_string();
    if let Some(name) = duplicate {
        if text.len() > 2 {
            let entry = json!({"dtype": "U8", "shape": [0], "data_offsets": [0, 0]});
            text.insert_str(1, &format!("{}:{entry},", json!(name)));
        }
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Any JSON value, a few levels deep, with numbers that matter to configs.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        nasty_number().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0.0), Just(-1.0), Just(1e-300), Just(1e308), Just(-0.0), any::<f64>()]
            .prop_filter_map("finite", |f: f64| serde_json::Number::from_f64(f).map(Value::Number)),
        "[a-zA-Z0-9_ ]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The harness itself: an unedited file (header re-serialised) is accepted.
#[test]
fn unedited_files_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let file = valid_file(dir.path(), &[(vec![2, 3], 0), (vec![4], 1), (vec![], 3), (vec![0, 5], 2)]);
    let p = dir.path().join("case.safetensors");
    std::fs::write(&p, edit_header(&file, &[])).unwrap();
    assert_eq!(SafetensorsFile::open(&p).unwrap().tensors().len(), 4);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_safetensors_never_panic(
        tensors in prop::collection::vec((prop::collection::vec(0usize..5, 0..4), 0u8..4), 0..4),
        edits in prop::collection::vec(header_edit(), 0..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = edit_header(&valid_file(dir.path(), &tensors), &edits);
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        open_checked(dir.path(), &bytes);
    }

    #[test]
    fn random_bytes_never_panic(len in nasty_number(), body in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        // A plausible length prefix half the time, so the JSON parser sees the noise.
        let len = if len % 2 == 0 { body.len() as u64 } else { len };
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        open_checked(dir.path(), &bytes);
    }

    #[test]
    fn mutated_configs_never_panic(
        which in 0usize..4,
        edits in prop::collection::vec(("[a-z_]{1,20}", json_value()), 0..4),
        known in prop::collection::vec((any::<prop::sample::Index>(), json_value()), 0..3),
        removals in prop::collection::vec(any::<prop::sample::Index>(), 0..3),
    ) {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline");
        let base = ["transformer/config.json", "text_encoder/config.json", "vae/config.json", "scheduler/scheduler_config.json"];
        let mut v: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join(base[which])).unwrap()).unwrap();
        let keys: Vec<String> = v.keys().cloned().collect();
        for (at, value) in known {
            v.insert(keys[at.index(keys.len())].clone(), value);
        }
        for at in removals {
            v.remove(&keys[at.index(keys.len())]);
        }
        for (k, value) in edits {
            v.insert(k, value);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, Value::Object(v).to_string()).unwrap();
        load_any(&p);
    }

    #[test]
    fn random_config_text_never_panics(text in prop_oneof![".{0,64}", json_value().prop_map(|v| v.to_string())]) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, text).unwrap();
        load_any(&p);
    }
}

/// Every config parser on one file; what they accept must also size without a panic.
fn load_any(p: &Path) {
    if let Ok(cfg) = TransformerConfig::from_json_file(p) {
        let _ = (cfg.hidden(), cfg.mlp_hidden(), cfg.out_features());
        let _ = flux2::synth::transformer_bytes(&cfg, Layout::Bfl, DType::BF16);
    }
    if let Ok(cfg) = Qwen3Config::from_json_file(p) {
        let _ = (cfg.head_dim(), cfg.kv_heads(), cfg.theta());
    }
    if let Ok(cfg) = VaeConfig::from_json_file(p) {
        let _ = (cfg.scale_factor(), cfg.packed_channels(), cfg.pixel_multiple());
    }
    let _ = SchedulerConfig::from_json_file(p);
}
