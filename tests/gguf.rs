//! GGUF reading: every GGML type flux2 reads dequantises bit for bit as the `gguf` package's numpy
//! reference (tests/fixtures/gguf/types.gguf, scripts/reference/make_gguf_fixtures.py), and damaged
//! files are clean errors.

mod common;

use common::{fixtures, run_cli};
use flux2::weights::gguf::GgufFile;

fn types_file() -> std::path::PathBuf {
    fixtures().join("gguf/types.gguf")
}

#[test]
fn every_type_dequantises_bit_exactly() {
    let f = GgufFile::open(&types_file()).unwrap();
    let mut checked = Vec::new();
    for t in f.tensors().iter().filter(|t| !t.name.ends_with(".expected")) {
        let got = f.dequantize(&t.name).unwrap();
        let want_name = format!("{}.expected", t.name);
        let want = match f.get(&want_name) {
            Some(_) => f.dequantize(&want_name).unwrap(),
            None => continue, // f32 / f16: the stored values are the reference
        };
        assert_eq!(got.len(), want.len(), "{}", t.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{} element {i}: {g} vs {w}", t.name);
        }
        assert_eq!(t.shape, f.get(&want_name).unwrap().shape, "{}: shapes are PyTorch order", t.name);
        checked.push(t.ggml_type().unwrap().name());
    }
    checked.sort();
    assert_eq!(checked, ["BF16", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]);
    let f16 = f.dequantize("t.f16").unwrap();
    let f32 = f.dequantize("t.f32").unwrap();
    assert!(f16.iter().zip(&f32).all(|(a, b)| (a - b).abs() <= b.abs() * 1e-3 + 1e-6));
    assert_eq!(f.get("t.f32").unwrap().shape, vec![5, 7]);
}

#[test]
fn damaged_files_are_clean_errors() {
    let bytes = std::fs::read(types_file()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    // Truncated anywhere: an error (or, past the last tensor, a file that still reads), never a panic.
    for cut in (0..bytes.len()).step_by(97) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        if let Ok(f) = GgufFile::open(&path) {
            for t in f.tensors() {
                let _ = f.dequantize(&t.name);
            }
        }
    }
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("x.gguf") && e.contains("truncated"), "{e}");
    // Single bytes flipped across the header: errors or readable files, never a panic.
    let mut state = 12345u64;
    for _ in 0..3000 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut m = bytes.clone();
        let at = (state >> 33) as usize % 2048.min(m.len());
        m[at] = (state >> 17) as u8;
        std::fs::write(&path, &m).unwrap();
        if let Ok(f) = GgufFile::open(&path) {
            for t in f.tensors() {
                let _ = f.dequantize(&t.name);
            }
        }
    }
    std::fs::write(&path, b"GGUF\x09\x00\x00\x00").unwrap();
    assert!(GgufFile::open(&path).unwrap_err().to_string().contains("version 9"));
}

#[test]
fn inspect_reports_a_gguf_file() {
    let path = types_file();
    let (ok, out, err) = run_cli(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["kind"], "gguf");
    assert_eq!(report["version"], 3);
    let types: Vec<&str> = report["types"].as_array().unwrap().iter().map(|t| t["type"].as_str().unwrap()).collect();
    for ty in ["Q4_K", "Q6_K", "Q8_0", "BF16", "F32"] {
        assert!(types.contains(&ty), "{types:?}");
    }
}
