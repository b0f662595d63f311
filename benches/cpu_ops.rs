//! Criterion benchmarks of the CPU reference ops at small model-like shapes (the GPU paths are
//! timed by `flux2 bench` on a GPU machine).

use criterion::{criterion_group, criterion_main, Criterion};
use flux2::backend::cpu::CpuBackend;
use flux2::quant::{quantize, QuantFormat};
use flux2::{AttnMask, Backend, Padding2d, Tensor};

fn t(name: &str, shape: &[usize]) -> Tensor {
    Tensor::from_f32(flux2::rng::normal_vec(1, name, shape.iter().product()), shape).unwrap()
}

fn ops(c: &mut Criterion) {
    let be = CpuBackend::new();
    let (x, w) = (t("x", &[256, 1024]), t("w", &[1024, 1024]));
    c.bench_function("linear 256x1024x1024", |b| b.iter(|| be.linear(&x, &w, None).unwrap()));
    let q8 = be.load_quantized(&quantize(&w.to_vec_f32().unwrap(), 1024, 1024, QuantFormat::Fp8).unwrap()).unwrap();
    c.bench_function("linear_fp8 256x1024x1024", |b| b.iter(|| be.linear_fp8(&x, &q8, None).unwrap()));
    let (q, k, v) = (t("q", &[1, 512, 4, 64]), t("k", &[1, 512, 4, 64]), t("v", &[1, 512, 4, 64]));
    c.bench_function("attention N512 H4 D64", |b| b.iter(|| be.attention(&q, &k, &v, &AttnMask::None, 0.125).unwrap()));
    c.bench_function("attention_sage N512 H4 D64", |b| {
        b.iter(|| be.attention_sage(&q, &k, &v, &AttnMask::None, 0.125).unwrap())
    });
    let (img, cw) = (t("img", &[1, 64, 64, 64]), t("cw", &[64, 64, 3, 3]));
    c.bench_function("conv2d 64ch 64x64 3x3", |b| {
        b.iter(|| be.conv2d(&img, &cw, None, 1, Padding2d::same(1)).unwrap())
    });
    let h = t("h", &[1, 1024, 3072]);
    let (shift, scale) = (t("s", &[1, 3072]), t("c", &[1, 3072]));
    c.bench_function("layer_norm_modulate 1024x3072", |b| {
        b.iter(|| be.layer_norm_modulate(&h, &shift, &scale, 1e-6).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = ops
}
criterion_main!(benches);
