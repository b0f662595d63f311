//! Loader errors: every bad checkpoint gives an error that names the file and key, never a panic.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::fixtures;
use flux2::backend::cpu::CpuBackend;
use flux2::model::transformer::Flux2Transformer;
use flux2::weights::safetensors::{write_safetensors, TensorEntry};
use flux2::weights::WeightStore;
use flux2::{Backend, DType, Error};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn write(path: &std::path::Path, tensors: &[(&str, Vec<f32>, Vec<usize>, DType)]) {
    let entries = tensors.iter().map(|(n, v, s, d)| TensorEntry::from_f32(n, v, s, *d)).collect();
    write_safetensors(path, entries, &BTreeMap::new()).unwrap();
}

#[test]
fn roundtrip_all_storage_dtypes() {
    let dir = tmp();
    let p = dir.path().join("a.safetensors");
    let v = vec![1.0, -2.0, 0.5, 448.0];
    write(
        &p,
        &[
            ("f32", v.clone(), vec![4], DType::F32),
            ("bf16", v.clone(), vec![2, 2], DType::BF16),
            ("f16", v.clone(), vec![4], DType::F16),
            ("fp8", v.clone(), vec![4], DType::F8E4M3),
        ],
    );
    let s = WeightStore::open(&p).unwrap();
    for name in ["f32", "bf16", "f16", "fp8"] {
        assert_eq!(s.get(name).unwrap().to_f32().unwrap(), v, "{name}");
    }
    let be = CpuBackend::new();
    let t = s.load(&be, "bf16", &[2, 2]).unwrap();
    assert_eq!(t.to_vec_f32().unwrap(), v);
}

#[test]
fn corrupt_header_is_a_clear_error() {
    let dir = tmp();
    let p = dir.path().join("bad.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
    let e = WeightStore::open(&p).unwrap_err();
    assert!(matches!(e, Error::CorruptFile { .. }), "{e}");
    assert!(e.to_string().contains("bad.safetensors") && e.to_string().contains("JSON"), "{e}");

    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
    assert!(WeightStore::open(&p).unwrap_err().to_string().contains("implausible"));
    std::fs::write(&p, b"abc").unwrap();
    assert!(WeightStore::open(&p).unwrap_err().to_string().contains("too small"));
    // Header that claims more bytes than the file has.
    std::fs::write(&p, b"\x00\x01\x00\x00\x00\x00\x00\x00{}").unwrap();
    assert!(WeightStore::open(&p).unwrap_err().to_string().contains("truncated"));
}

#[test]
fn truncated_data_is_a_clear_error() {
    let dir = tmp();
    let src = fixtures().join("transformer/t2i_nonsquare/bfl.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let p = dir.path().join("cut.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = WeightStore::open(&p).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("cut.safetensors") && msg.contains("truncated"), "{msg}");
}

#[test]
fn inconsistent_entries_are_errors() {
    let dir = tmp();
    let p = dir.path().join("x.safetensors");
    // Shape says 4 elements, offsets hold 2 floats.
    let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(&[0u8; 8]);
    std::fs::write(&p, &b).unwrap();
    assert!(WeightStore::open(&p).unwrap_err().to_string().contains("needs 16"));
    // Unknown dtype.
    let header = br#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.push(0);
    std::fs::write(&p, &b).unwrap();
    assert!(WeightStore::open(&p).unwrap_err().to_string().contains("unknown dtype"));
}

#[test]
fn missing_key_wrong_shape_and_unsupported_dtype() {
    let dir = tmp();
    let p = dir.path().join("w.safetensors");
    write(&p, &[("a", vec![1.0; 6], vec![2, 3], DType::F32)]);
    // Integer tensors are valid safetensors but not weights we compute with.
    let header = br#"{"ids":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#;
    let q = dir.path().join("i8.safetensors");
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(&[1, 2]);
    std::fs::write(&q, &b).unwrap();

    let s = WeightStore::open(&p).unwrap();
    let e = s.get("b").unwrap_err();
    assert!(
        matches!(e, Error::MissingKey { .. })
            && e.to_string().contains("w.safetensors")
            && e.to_string().contains("`b`"),
        "{e}"
    );
    let e = s.get_shaped("a", &[3, 2]).unwrap_err();
    assert!(e.to_string().contains("[2, 3]") && e.to_string().contains("[3, 2]"), "{e}");
    let e = WeightStore::open(&q).unwrap().get("ids").unwrap().dtype().unwrap_err();
    assert!(matches!(e, Error::UnsupportedDType { .. }) && e.to_string().contains("I8"), "{e}");
    assert!(matches!(WeightStore::open(&dir.path().join("nope.safetensors")).unwrap_err(), Error::Io { .. }));
}

#[test]
fn sharded_index_is_checked() {
    let dir = tmp();
    write(&dir.path().join("s1.safetensors"), &[("a", vec![1.0], vec![1], DType::F32)]);
    write(&dir.path().join("s2.safetensors"), &[("b", vec![2.0], vec![1], DType::F32)]);
    let index = dir.path().join("m.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#).unwrap();
    let s = WeightStore::open(dir.path()).unwrap();
    assert_eq!(s.get("b").unwrap().to_f32().unwrap(), vec![2.0]);
    assert_eq!(s.len(), 2);
    // The index lists a key its shard does not hold.
    std::fs::write(&index, r#"{"weight_map":{"a":"s1.safetensors","c":"s2.safetensors"}}"#).unwrap();
    assert!(WeightStore::open(dir.path()).unwrap_err().to_string().contains("`c"));
    // The index names a shard that does not exist.
    std::fs::write(&index, r#"{"weight_map":{"a":"s3.safetensors"}}"#).unwrap();
    assert!(WeightStore::open(&index).unwrap_err().to_string().contains("s3.safetensors"));
}

#[test]
fn model_with_a_missing_or_misshaped_tensor_fails_cleanly() {
    let dir = tmp();
    let src = WeightStore::open(&fixtures().join("transformer/t2i_nonsquare/bfl.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> =
        src.keys().map(|k| (k.to_string(), src.get(k).unwrap().to_f32().unwrap(), src.shape(k).unwrap())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let save = |name: &str, tensors: &[(String, Vec<f32>, Vec<usize>)]| {
        let p = dir.path().join(name);
        let entries = tensors.iter().map(|(n, v, s)| TensorEntry::from_f32(n, v, s, DType::F32)).collect();
        write_safetensors(&p, entries, &BTreeMap::new()).unwrap();
        p
    };

    let missing: Vec<_> = tensors.iter().filter(|t| t.0 != "single_blocks.1.linear2.weight").cloned().collect();
    let e = Flux2Transformer::load(be.clone(), &save("missing.safetensors", &missing)).err().unwrap();
    assert!(e.to_string().contains("single_blocks.1.linear2.weight"), "{e}");

    let mut bad = tensors.clone();
    let proj = bad.iter_mut().find(|t| t.0 == "double_blocks.0.img_attn.proj.weight").unwrap();
    proj.2 = vec![proj.2[1], proj.2[0] / 2, 2];
    let e = Flux2Transformer::load(be.clone(), &save("shape.safetensors", &bad)).err().unwrap();
    assert!(matches!(e, Error::WrongShape { .. }) && e.to_string().contains("img_attn.proj"), "{e}");

    // Tensors the config is inferred from with the wrong rank, or too few rows for 3 x hidden.
    let mut flat = tensors.clone();
    let img_in = flat.iter_mut().find(|t| t.0 == "img_in.weight").unwrap();
    img_in.2 = vec![img_in.1.len()];
    let e = Flux2Transformer::load(be.clone(), &save("flat.safetensors", &flat)).err().unwrap().to_string();
    assert!(e.contains("img_in.weight") && e.contains("2 dimensions"), "{e}");
    let mut short: Vec<_> =
        tensors.iter().filter(|t| !t.0.starts_with("double_blocks.0.img_mlp.0.")).cloned().collect();
    let fused = short.iter_mut().find(|t| t.0 == "single_blocks.0.linear1.weight").unwrap();
    let cols = fused.2[1];
    (fused.1, fused.2) = (vec![0.0; 2 * cols], vec![2, cols]);
    let e = Flux2Transformer::load(be.clone(), &save("short.safetensors", &short)).err().unwrap().to_string();
    assert!(e.contains("single_blocks.0.linear1.weight") && e.contains("fewer than 3 x hidden"), "{e}");

    // Something that is not a FLUX.2 transformer at all.
    let p = dir.path().join("other.safetensors");
    write(&p, &[("encoder.conv_in.weight", vec![0.0; 4], vec![4], DType::F32)]);
    assert!(Flux2Transformer::load(be, &p).err().unwrap().to_string().contains("not a FLUX.2 transformer"));
}

#[test]
fn comfy_prefixed_single_files_load() {
    let dir = tmp();
    let src = WeightStore::open(&fixtures().join("transformer/t2i_nonsquare/bfl.safetensors")).unwrap();
    let tensors: Vec<(String, Vec<f32>, Vec<usize>)> = src
        .keys()
        .map(|k| (format!("model.diffusion_model.{k}"), src.get(k).unwrap().to_f32().unwrap(), src.shape(k).unwrap()))
        .collect();
    let p = dir.path().join("comfy.safetensors");
    write_safetensors(
        &p,
        tensors.iter().map(|(n, v, s)| TensorEntry::from_f32(n, v, s, DType::F32)).collect(),
        &BTreeMap::new(),
    )
    .unwrap();
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let m = Flux2Transformer::load(be, &p).unwrap();
    assert_eq!(m.config().num_single_layers, 2);
}

/// A file image from a raw header and `data_len` zero bytes of data.
fn raw_file(dir: &std::path::Path, header: &str, data_len: usize) -> std::path::PathBuf {
    let p = dir.join("raw.safetensors");
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    std::fs::write(&p, &b).unwrap();
    p
}

fn open_err(dir: &std::path::Path, header: &str, data_len: usize) -> String {
    let e = WeightStore::open(&raw_file(dir, header, data_len)).unwrap_err();
    assert!(matches!(e, Error::CorruptFile { .. }), "{e}");
    e.to_string()
}

#[test]
fn duplicate_tensor_names_are_errors() {
    let dir = tmp();
    let h = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let e = open_err(dir.path(), h, 8);
    assert!(e.contains("`w`") && e.contains("twice"), "{e}");
    // A repeated field inside one entry is as ambiguous.
    let h = r#"{"w":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#;
    let e = open_err(dir.path(), h, 4);
    assert!(e.contains("`w`") && e.contains("duplicate field"), "{e}");
}

#[test]
fn overflowing_shapes_are_errors_not_wraps() {
    let dir = tmp();
    // 2^59 F32 elements is 2^64 bytes: wraps to 0 in unchecked arithmetic.
    let e = open_err(dir.path(), r#"{"w":{"dtype":"F32","shape":[576460752303423488],"data_offsets":[0,0]}}"#, 0);
    assert!(e.contains("`w`") && e.contains("overflows"), "{e}");
    let e = open_err(dir.path(), r#"{"w":{"dtype":"BF16","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#, 0);
    assert!(e.contains("overflows"), "{e}");
    let e = open_err(dir.path(), r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#, 4);
    assert!(e.contains("truncated"), "{e}");
    let e = open_err(dir.path(), r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, 4);
    assert!(e.contains("`w`"), "{e}");
    // Half a byte of F4 is not a whole number of bytes.
    let e = open_err(dir.path(), r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#, 2);
    assert!(e.contains("whole number of bytes"), "{e}");
}

#[test]
fn offsets_must_tile_the_data_region() {
    let dir = tmp();
    let t = |name: &str, a: usize, b: usize| {
        format!(r#""{name}":{{"dtype":"U8","shape":[{}],"data_offsets":[{a},{b}]}}"#, b - a)
    };
    let e = open_err(dir.path(), &format!("{{{},{}}}", t("a", 0, 8), t("b", 4, 12)), 12);
    assert!(e.contains("tensor `b` overlaps `a`"), "{e}");
    let e = open_err(dir.path(), &format!("{{{},{}}}", t("a", 0, 4), t("b", 6, 10)), 10);
    assert!(e.contains("gap of 2 bytes before tensor `b`"), "{e}");
    let e = open_err(dir.path(), &format!("{{{}}}", t("a", 2, 4)), 4);
    assert!(e.contains("gap of 2 bytes before tensor `a`"), "{e}");
    let e = open_err(dir.path(), &format!("{{{},{}}}", t("a", 0, 4), t("b", 4, 8)), 9);
    assert!(e.contains("data region has 1 bytes after the last tensor"), "{e}");
    let e = open_err(dir.path(), "{}", 3);
    assert!(e.contains("3 bytes after"), "{e}");
    // Out of order in the header, empty tensors sharing an offset: still a valid tiling.
    let p =
        raw_file(dir.path(), &format!("{{{},{},{},{}}}", t("b", 4, 8), t("e", 4, 4), t("a", 0, 4), t("f", 4, 4)), 8);
    let s = WeightStore::open(&p).unwrap();
    assert_eq!(s.len(), 4);
    assert_eq!(s.get("b").unwrap().bytes.len(), 4);
}

#[test]
fn metadata_and_trailing_text_follow_the_format() {
    let dir = tmp();
    let e = open_err(dir.path(), r#"{"__metadata__":{"format":1}}"#, 0);
    assert!(e.contains("__metadata__"), "{e}");
    let e = open_err(dir.path(), r#"{} {}"#, 0);
    assert!(e.contains("JSON"), "{e}");
    let p = raw_file(dir.path(), r#"{"__metadata__":{"format":"pt"}}     "#, 0);
    assert_eq!(WeightStore::open(&p).unwrap().files()[0].metadata()["format"], "pt");
}

/// Every committed fixture (written by torch's safetensors and by `write_safetensors`) passes
/// the strict header checks.
#[test]
fn every_fixture_parses() {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&fixtures(), &mut files);
    assert!(files.len() > 10);
    for f in files {
        if let Err(e) = flux2::weights::safetensors::SafetensorsFile::open(&f) {
            panic!("{e}");
        }
    }
}
