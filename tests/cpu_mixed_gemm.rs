//! The CPU backend's bf16 precision: the mixed-precision GEMM on every instruction-set path this
//! machine has (forced in turn) against the f32 reference, on ragged shapes, for bf16, f16 and
//! fp8 weights; and weights loaded from a file staying in its memory map.

use std::collections::BTreeMap;

use flux2::backend::cpu::mixed_gemm;
use flux2::backend::cpu::{CpuBackend, CpuPrecision, Isa};
use flux2::dtype::encode_from_f32;
use flux2::rng::{normal, stream_key};
use flux2::tensor::{CpuStorage, Tensor};
use flux2::weights::safetensors::{write_safetensors, TensorEntry};
use flux2::weights::WeightStore;
use flux2::{Backend, DType};

fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let key = stream_key(seed, "mixed_gemm");
    (0..n).map(|i| normal(key, i as u64) * scale).collect()
}

/// Shapes that leave remainders in every blocking dimension (MR 6/12, NR 16/32, 32-wide
/// activation packing, 16×16 AMX tiles, odd k), plus one of klein's own widths.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 7, 5),
    (5, 33, 17),
    (13, 31, 33),
    (12, 64, 32),
    (25, 130, 70),
    (40, 257, 100),
    (70, 96, 80),
    (7, 3072, 96),
    // v4: k in several L2 chunks, whole 32 × 32 blocks stored straight into y beside edge ones.
    (70, 4100, 300),
];

/// Checks `y` against the f64 product of the reference operands, element by element, against a
/// bound proportional to Σ|x·w| (the scale of each output's rounding error).
#[allow(clippy::too_many_arguments)]
fn check(label: &str, y: &[f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, rel: f64) {
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut mag) = (0f64, 0f64);
            for kk in 0..k {
                let p = x[i * k + kk] as f64 * w[j * k + kk] as f64;
                exact += p;
                mag += p.abs();
            }
            let err = (y[i * n + j] as f64 - exact).abs();
            assert!(
                err <= rel * mag + 1e-30,
                "{label}: y[{i},{j}] = {} vs {exact} (err {err:.3e}, bound {:.3e})",
                y[i * n + j],
                rel * mag
            );
        }
    }
}

fn weight_tensor(w: &[f32], dtype: DType, n: usize, k: usize) -> (Tensor, Vec<f32>) {
    let bytes = encode_from_f32(w, dtype);
    let be = CpuBackend::with_precision(CpuPrecision::Bf16, Isa::Portable);
    let t = be.load_weight(&bytes, dtype, &[n, k]).unwrap();
    let widened = t.to_vec_f32().unwrap();
    (t, widened)
}

#[test]
fn every_available_path_matches_the_reference_on_ragged_shapes() {
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    eprintln!("paths on this CPU: {:?}", paths);
    for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
        let x = random(2 * s as u64, m * k, 1.0);
        let w = random(2 * s as u64 + 1, n * k, 0.05);
        let bias = random(99, n, 1.0);
        for dtype in [DType::BF16, DType::F16, DType::F8E4M3] {
            let (wt, wf) = weight_tensor(&w, dtype, n, k);
            let xt = Tensor::from_f32(x.clone(), &[m, k]).unwrap();
            for &isa in &paths {
                let y = mixed_gemm::linear(isa, &xt, &wt, None).unwrap().to_vec_f32().unwrap();
                // v3 on bf16 weights and v4 on bf16/fp8 weights round the activations (to bf16:
                // 2^-9 relative per product); the other paths compute in f32 on exactly widened weights.
                let rounds =
                    (isa == Isa::Avx512Bf16 && dtype == DType::BF16) || (isa == Isa::Amx && dtype != DType::F16);
                let rel = if rounds { 2f64.powi(-8) } else { 1e-5 };
                check(&format!("{} {dtype} {m}x{k}x{n}", isa.name()), &y, &x, &wf, m, k, n, rel);
            }
            // Through the backend, with a bias and a batch dimension.
            let be = CpuBackend::with_precision(CpuPrecision::Bf16, Isa::best());
            let x3 = Tensor::from_f32(x.clone(), &[1, m, k]).unwrap();
            let b = Tensor::from_f32(bias.clone(), &[n]).unwrap();
            let y = be.linear(&x3, &wt, Some(&b)).unwrap();
            assert_eq!(y.shape(), &[1, m, n]);
            let reference = CpuBackend::new()
                .linear(&x3, &Tensor::from_f32(wf.clone(), &[n, k]).unwrap(), Some(&b))
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let y = y.to_vec_f32().unwrap();
            let worst = y.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(worst <= 0.02 * scale.max(1.0), "backend {dtype} {m}x{k}x{n}: max error {worst} (scale {scale})");
        }
    }
}

/// The paths reuse their packing buffers between calls (v4: activations, weight panels): a
/// product whose operands are all NaN leaves those buffers full of NaN, and the smaller ragged
/// products after it must not see any of it (padding rows, pairs and columns rewritten).
#[test]
fn reused_buffers_never_leak_into_a_later_product() {
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    let (m, k, n) = (70, 4100, 300);
    let (poison_w, _) = weight_tensor(&vec![f32::NAN; n * k], DType::BF16, n, k);
    let poison_x = Tensor::from_f32(vec![f32::NAN; m * k], &[m, k]).unwrap();
    for &isa in &paths {
        mixed_gemm::linear(isa, &poison_x, &poison_w, None).unwrap();
        for (s, &(m, k, n)) in [(5, 33, 17), (13, 34, 64), (40, 258, 100)].iter().enumerate() {
            let x = random(40 + s as u64, m * k, 1.0);
            let w = random(50 + s as u64, n * k, 0.05);
            let (wt, wf) = weight_tensor(&w, DType::BF16, n, k);
            let y = mixed_gemm::linear(isa, &Tensor::from_f32(x.clone(), &[m, k]).unwrap(), &wt, None).unwrap();
            let rel = if isa == Isa::Avx512Bf16 || isa == Isa::Amx { 2f64.powi(-8) } else { 1e-5 };
            check(&format!("after NaN, {} {m}x{k}x{n}", isa.name()), &y.to_vec_f32().unwrap(), &x, &wf, m, k, n, rel);
        }
    }
}

#[test]
fn f32_precision_widens_and_bf16_precision_keeps_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let w = random(5, 48 * 40, 0.1);
    write_safetensors(&path, vec![TensorEntry::from_f32("w", &w, &[48, 40], DType::BF16)], &BTreeMap::new()).unwrap();
    let store = WeightStore::open(&path).unwrap();

    let bf16 = CpuBackend::with_precision(CpuPrecision::Bf16, Isa::best());
    let kept = store.load(&bf16, "w", &[48, 40]).unwrap();
    assert!(matches!(kept.cpu_storage(), Some(CpuStorage::Mapped(_, DType::BF16))));
    assert_eq!(kept.cpu_storage().unwrap().heap_bytes(), 0);

    let f32 = CpuBackend::new();
    let widened = store.load(&f32, "w", &[48, 40]).unwrap();
    assert!(matches!(widened.cpu_storage(), Some(CpuStorage::F32(_))));
    assert_eq!(kept.to_vec_f32().unwrap(), widened.to_vec_f32().unwrap());

    // The mapped weight outlives the store (the tensor holds the map).
    drop(store);
    let xv = random(6, 3 * 40, 1.0);
    let x = Tensor::from_f32(xv.clone(), &[3, 40]).unwrap();
    let y = bf16.linear(&x, &kept, None).unwrap().to_vec_f32().unwrap();
    check("mapped", &y, &xv, &widened.to_vec_f32().unwrap(), 3, 40, 48, 2f64.powi(-8));
    // A fused projection of mapped pieces lists them instead of copying, and computes the same.
    let fused = bf16.concat(&[&kept, &kept.narrow(0, 8, 16).unwrap()], 0).unwrap();
    assert!(matches!(fused.cpu_storage(), Some(CpuStorage::MappedRows(..))));
    assert_eq!(fused.cpu_storage().unwrap().heap_bytes(), 0);
    let yf = bf16.linear(&x, &fused, None).unwrap().to_vec_f32().unwrap();
    for r in 0..3 {
        assert_eq!(&yf[r * 64..r * 64 + 48], &y[r * 48..r * 48 + 48]);
        assert_eq!(&yf[r * 64 + 48..r * 64 + 64], &y[r * 48 + 8..r * 48 + 24]);
    }
    assert_eq!(
        fused.narrow(0, 48, 16).unwrap().to_vec_f32().unwrap(),
        kept.narrow(0, 8, 16).unwrap().to_vec_f32().unwrap()
    );
    // Bad input is an error, not a panic.
    let wrong = Tensor::from_f32(vec![0.0; 3 * 41], &[3, 41]).unwrap();
    assert!(bf16.linear(&wrong, &kept, None).is_err());
}

/// Fused projections (q, k, v loaded separately, concatenated by rows) keep the stored dtype in
/// bf16 precision, and the fused linear equals the parts' linears side by side.
#[test]
fn row_concatenation_keeps_the_stored_dtype() {
    let be = CpuBackend::with_precision(CpuPrecision::Bf16, Isa::best());
    let parts: Vec<Tensor> = [(5usize, 1u64), (3, 2)]
        .iter()
        .map(|&(rows, seed)| {
            be.load_weight(&encode_from_f32(&random(seed, rows * 24, 0.2), DType::BF16), DType::BF16, &[rows, 24])
                .unwrap()
        })
        .collect();
    let fused = be.concat(&[&parts[0], &parts[1]], 0).unwrap();
    assert_eq!(fused.dtype(), DType::BF16);
    assert_eq!(fused.shape(), &[8, 24]);
    let x = Tensor::from_f32(random(9, 2 * 24, 1.0), &[2, 24]).unwrap();
    let y = be.linear(&x, &fused, None).unwrap().to_vec_f32().unwrap();
    let (a, b) = (be.linear(&x, &parts[0], None).unwrap(), be.linear(&x, &parts[1], None).unwrap());
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    for r in 0..2 {
        assert_eq!(&y[r * 8..r * 8 + 5], &a[r * 5..r * 5 + 5]);
        assert_eq!(&y[r * 8 + 5..r * 8 + 8], &b[r * 3..r * 3 + 3]);
    }
}

/// The bf16-precision convolution (weights as stored; unfolded pixel rows on the mixed GEMM, or
/// on v4 at stride 1 the tiles read from the padded image) on every available path against the f32 convolution on the widened weight: ragged channel counts,
/// stride 2 with one-sided padding (the VAE's downsampler), 1×1, a batch of two, and bias.
#[test]
fn mixed_convolution_matches_the_reference_on_every_path() {
    use flux2::backend::Padding2d;
    let cases = [
        (2, 3, 7, 9, 5, 3, 1, Padding2d::same(1)),
        (1, 33, 12, 10, 40, 3, 2, Padding2d { top: 0, bottom: 1, left: 0, right: 1 }),
        (1, 20, 6, 5, 17, 1, 1, Padding2d::same(0)),
        // Two channel blocks and a ragged one, rows longer than one 32-pixel step, uneven padding.
        (2, 70, 5, 37, 45, 3, 1, Padding2d { top: 1, bottom: 0, left: 2, right: 1 }),
    ];
    for (c, &(b, cin, h, wd, cout, ks, stride, pad)) in cases.iter().enumerate() {
        let x = Tensor::from_f32(random(40 + c as u64, b * cin * h * wd, 1.0), &[b, cin, h, wd]).unwrap();
        let wv = random(50 + c as u64, cout * cin * ks * ks, 0.1);
        let bias = Tensor::from_f32(random(60 + c as u64, cout, 1.0), &[cout]).unwrap();
        for dtype in [DType::BF16, DType::F16, DType::F8E4M3] {
            let bytes = encode_from_f32(&wv, dtype);
            let reference_w = Tensor::from_f32(
                CpuBackend::new().load_weight(&bytes, dtype, &[cout, cin, ks, ks]).unwrap().to_vec_f32().unwrap(),
                &[cout, cin, ks, ks],
            )
            .unwrap();
            let reference =
                CpuBackend::new().conv2d(&x, &reference_w, Some(&bias), stride, pad).unwrap().to_vec_f32().unwrap();
            let scale = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let be = CpuBackend::with_precision(CpuPrecision::Bf16, isa);
                let w = be.load_weight(&bytes, dtype, &[cout, cin, ks, ks]).unwrap();
                assert_eq!(w.dtype(), dtype, "bf16 precision keeps the stored weight");
                let y = be.conv2d(&x, &w, Some(&bias), stride, pad).unwrap();
                assert_eq!(y.shape(), CpuBackend::new().conv2d(&x, &reference_w, None, stride, pad).unwrap().shape());
                let worst =
                    y.to_vec_f32().unwrap().iter().zip(&reference).map(|(a, r)| (a - r).abs()).fold(0f32, f32::max);
                assert!(
                    worst <= 2f32.powi(-7) * scale,
                    "{} {dtype} case {c}: max error {worst} (output scale {scale})",
                    isa.name()
                );
            }
        }
    }
}

/// bf16-precision attention (bf16 operands on the v3/v4 GEMMs, f32 softmax) against the f32
/// reference: several query blocks, grouped KV heads, an odd head size, causal with padding.
#[test]
fn mixed_attention_matches_the_reference() {
    use flux2::backend::AttnMask;
    let cases = [
        (1, 700, 4, 700, 2, 64, AttnMask::None),
        (2, 530, 3, 530, 3, 24, AttnMask::Causal { valid_len: Some(vec![530, 311]) }),
        (1, 9, 2, 40, 1, 128, AttnMask::None),
        // The fused v4 kernel under masks: causal with padding (rows past 157 of the second
        // sample see 157 keys), and plain causal.
        (2, 300, 2, 300, 1, 64, AttnMask::Causal { valid_len: Some(vec![300, 157]) }),
        (1, 170, 2, 170, 2, 32, AttnMask::Causal { valid_len: None }),
    ];
    for (c, (b, nq, h, nk, hkv, d, mask)) in cases.into_iter().enumerate() {
        let t = |seed: u64, n: usize, heads: usize| {
            Tensor::from_f32(random(seed, b * n * heads * d, 1.0), &[b, n, heads, d]).unwrap()
        };
        let (q, k, v) = (t(70 + c as u64, nq, h), t(80 + c as u64, nk, hkv), t(90 + c as u64, nk, hkv));
        let scale = 1.0 / (d as f32).sqrt();
        let reference = CpuBackend::new().attention(&q, &k, &v, &mask, scale).unwrap().to_vec_f32().unwrap();
        for isa in [Isa::Avx512Bf16, Isa::Amx].into_iter().filter(|i| i.available()) {
            let y = CpuBackend::with_precision(CpuPrecision::Bf16, isa).attention(&q, &k, &v, &mask, scale).unwrap();
            assert_eq!(y.shape(), &[b, nq, h, d]);
            let worst = y.to_vec_f32().unwrap().iter().zip(&reference).map(|(a, r)| (a - r).abs()).fold(0f32, f32::max);
            let top = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(worst <= 0.02 * top, "{} case {c}: max error {worst} (max output {top})", isa.name());
        }
    }
}

/// Weight-only quantized weights in bf16 precision keep their codes (no dequantized copy) and
/// are dequantized in the GEMM's packing: every format on every available path against the f32
/// product with the dequantized weight (`quant::dequantize`), on ragged shapes: int8, int4 and
/// scaled fp8 made by `quantize` (int4 groups adapted to narrow widths, so some groups are shorter
/// than a packing step), and GGUF blocks (the vector-loaded Q8_0/Q4_0 and the row-decoded
/// K-quants), as `linear_quantized` and, for fp8, `linear_fp8` (activations rounded per token).
#[test]
fn quantized_weights_are_dequantized_in_the_packing_on_every_path() {
    use flux2::quant::{dequantize, quantize, QuantFormat, Quantized};
    use flux2::weights::ggml::{synthetic_blocks, GgmlType};
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    let shapes = [(1, 2, 1), (5, 34, 17), (13, 96, 33), (25, 130, 70), (7, 512, 96), (70, 4096, 300), (33, 4100, 65)];
    for (s, &(m, k, n)) in shapes.iter().enumerate() {
        let x = random(200 + s as u64, m * k, 1.0);
        let w = random(300 + s as u64, n * k, 0.05);
        let mut weights: Vec<Quantized> = [QuantFormat::Int8, QuantFormat::Int4 { group: 64 }, QuantFormat::Fp8]
            .into_iter()
            .map(|f| quantize(&w, n, k, f).unwrap())
            .collect();
        for t in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q6K] {
            if k.is_multiple_of(t.block().0) {
                let codes = synthetic_blocks(t, n * k, 400 + s as u64);
                weights.push(Quantized { format: QuantFormat::Ggml(t), rows: n, cols: k, codes, scales: vec![] });
            }
        }
        let xt = Tensor::from_f32(x.clone(), &[m, k]).unwrap();
        for q in &weights {
            let wf = dequantize(q);
            for &isa in &paths {
                let be = CpuBackend::with_precision(CpuPrecision::Bf16, isa);
                let qt = be.load_quantized(q).unwrap();
                assert!(
                    matches!(qt.data.cpu_storage(), Some(CpuStorage::U8(c)) if c.len() == q.codes.len()),
                    "bf16 precision keeps the codes"
                );
                let y = be.linear_quantized(&xt, &qt, None).unwrap().to_vec_f32().unwrap();
                // v4 rounds the dequantized weight and the activations to bf16 (2^-9 each).
                let rel = if isa == Isa::Amx { 2f64.powi(-8) } else { 1e-5 };
                let label = format!("{} {:?} {m}x{k}x{n}", isa.name(), q.format);
                check(&label, &y, &x, &wf, m, k, n, rel);
                if q.format == QuantFormat::Fp8 {
                    let y = be.linear_fp8(&xt, &qt, None).unwrap().to_vec_f32().unwrap();
                    let reference = CpuBackend::new();
                    let r = reference.linear_fp8(&xt, &reference.load_quantized(q).unwrap(), None).unwrap();
                    let r = r.to_vec_f32().unwrap();
                    let scale = r.iter().map(|v| v.abs()).fold(0f32, f32::max);
                    let worst = y.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst <= 0.02 * scale.max(1e-3), "{label} linear_fp8: max error {worst} (scale {scale})");
                }
            }
        }
    }
    // A wrong input width is an error, not a panic.
    let be = CpuBackend::with_precision(CpuPrecision::Bf16, Isa::best());
    let q = quantize(&random(7, 8 * 64, 0.1), 8, 64, QuantFormat::Int8).unwrap();
    let qt = be.load_quantized(&q).unwrap();
    assert!(be.linear_quantized(&Tensor::from_f32(vec![0.0; 63], &[1, 63]).unwrap(), &qt, None).is_err());
}
