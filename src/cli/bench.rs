//! `flux2 bench`: kernel and model timings at the klein shapes (median of repeated runs after a
//! warm-up, each run synchronised), with the alternative paths measured in the same run, and
//! `flux2 profile attention`: every attention path's speed and error against f32.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use crate::backend::cpu::CpuBackend;
use crate::backend::cpu::CpuPrecision;
use crate::backend::{AttnMask, Backend};
use crate::device::{self, DeviceChoice};
use crate::dtype::{encode_from_f32, DType};
use crate::error::{Error, Result};
use crate::model::rope::PositionIds;
use crate::model::tokenizer::MAX_TOKENS;
use crate::model::transformer::config::TransformerConfig;
use crate::model::transformer::{scale_in_dtype, AttentionMode, Compute, Flux2Transformer, Steps};
use crate::planner::TransformerPrecision;
use crate::quant::{quantize, QuantFormat};
use crate::selftest::GemmKernels;
use crate::tensor::{DeviceKind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Gemm,
    Attention,
    Dit,
    Pipeline,
    /// The VAE decoder's convolutions at --width x --height, one row per distinct shape.
    Conv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shapes {
    Klein4b,
    Klein9b,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub suite: Suite,
    #[arg(long, value_enum, default_value_t = Shapes::Klein4b)]
    pub shapes: Shapes,
    /// Transformer or pipeline folder (dit, pipeline).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// gemm suite: the token counts (rows) to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [512, 4096, 4608])]
    pub rows: Vec<usize>,
    /// Reference images (of the output size) for the pipeline suite's KV-cache measurement.
    #[arg(long, default_value_t = 1)]
    pub kv_refs: usize,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU backend only: bf16 keeps the weights as stored (bf16/f16/fp8, in the memory map) and
    /// runs bf16 GEMMs; f32 widens every weight (the exact reference).
    #[arg(long, value_enum, default_value_t = CpuPrecision::Bf16)]
    pub cpu_precision: CpuPrecision,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Median seconds of `reps` synchronised runs after two warm-ups.
pub fn time(be: &dyn Backend, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    be.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        be.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// `time` with the GEMMs on `kernels` where that changes what runs for this device and shape
/// (`v2`: a CUDA device with v3 images; whole tiles: a v3 GEMM that would split its K slices by
/// stream-K; narrow: a v3 GEMM that would run 128x256 tiles; `(m, n, k_bytes)` is the shape); None
/// elsewhere.
fn time_gemm_kernels(
    be: &dyn Backend,
    reps: usize,
    kernels: GemmKernels,
    (m, n, k_bytes): (usize, usize, usize),
    f: impl FnMut() -> Result<()>,
) -> Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if let Some(c) = be.as_any().downcast_ref::<crate::backend::cuda::CudaBackend>() {
        let set: fn(&crate::backend::cuda::CudaBackend, bool) = match kernels {
            GemmKernels::V2 if c.has_gemm_v3() => crate::backend::cuda::CudaBackend::set_gemm_v2,
            GemmKernels::WholeTiles if c.gemm_stream_k_blocks(m, n, k_bytes).is_some() => {
                crate::backend::cuda::CudaBackend::set_gemm_whole_tiles
            }
            GemmKernels::Narrow if c.gemm_wide_tiles(m, n, k_bytes) => {
                crate::backend::cuda::CudaBackend::set_gemm_narrow_tiles
            }
            _ => return Ok(None),
        };
        return crate::selftest::with_cuda_switch(be, set, || time(be, reps, f)).map(Some);
    }
    let _ = (be, reps, kernels, m, n, k_bytes, f);
    Ok(None)
}

/// cuBLASLt, the baseline of `bench gemm` on CUDA devices (never constructed without the feature).
#[cfg(feature = "cuda")]
type Baseline = crate::backend::cuda::cublaslt::CublasLt;
#[cfg(not(feature = "cuda"))]
type Baseline = std::convert::Infallible;

/// cuBLASLt where the backend is CUDA and the library loads; otherwise None, with a note saying why.
fn load_baseline(be: &dyn Backend) -> Option<Baseline> {
    #[cfg(feature = "cuda")]
    if let Some(c) = be.as_any().downcast_ref::<crate::backend::cuda::CudaBackend>() {
        return match Baseline::load(c) {
            Ok(lt) => {
                println!("baseline: cuBLASLt ({}), FP8 with per-tensor scales", lt.library);
                Some(lt)
            }
            Err(e) => {
                println!("cuBLASLt columns skipped: {e}");
                None
            }
        };
    }
    let _ = be;
    None
}

/// cuBLASLt's bf16 and FP8 times for x [m, k] against the bf16 weight and the FP8 weight's codes
/// (x's codes quantized from its device values); None where there is no baseline or it failed
/// (with a note).
#[allow(clippy::too_many_arguments)]
fn time_baseline(
    be: &dyn Backend,
    reps: usize,
    lt: Option<&Baseline>,
    x: &Tensor,
    w: &Tensor,
    fp8: Option<&crate::backend::QuantTensor>,
    (m, n, k): (usize, usize, usize),
) -> (Option<f64>, Option<f64>) {
    #[cfg(feature = "cuda")]
    if let Some(lt) = lt {
        let bf16 = time(be, reps, || lt.bf16(x, w).map(|_| ()));
        let fp8 = fp8.map(|q| -> Result<f64> {
            let codes = be.load_quantized(&quantize(&x.to_vec_f32()?, m, k, QuantFormat::Fp8)?)?;
            time(be, reps, || lt.e4m3(&codes.data, &q.data, (m, n, k)).map(|_| ()))
        });
        let keep = |r: Result<f64>| r.map_err(|e| println!("cuBLASLt {m}x{k} · {n}x{k}ᵀ: {e}")).ok();
        return (keep(bf16), fp8.and_then(keep));
    }
    let _ = (be, reps, lt, x, w, fp8, (m, n, k));
    (None, None)
}

/// Datasheet dense peaks (TFLOP/s: bf16, fp8) of cards we know, to express rates as a fraction.
fn spec_peak(name: &str) -> Option<(f64, f64)> {
    let n = name.to_ascii_lowercase();
    if n.contains("h100") || n.contains("h200") || n.contains("gh200") {
        Some((989.0, 1979.0))
    } else if n.contains("b200") {
        Some((2250.0, 4500.0))
    } else if n.contains("a100") {
        Some((312.0, 312.0))
    } else if n.contains("l40s") {
        Some((362.0, 733.0))
    } else if n.contains("4090") {
        Some((165.0, 330.0))
    } else {
        None
    }
}

fn random(be: &dyn Backend, name: &str, shape: &[usize], scale: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = crate::rng::normal_vec(5, name, n).iter().map(|x| x * scale).collect();
    be.upload(&Tensor::from_f32(v, shape)?, be.activation_dtype())
}

fn transformer_config(shapes: Shapes) -> TransformerConfig {
    match shapes {
        Shapes::Klein4b => TransformerConfig::klein_4b(),
        Shapes::Klein9b => TransformerConfig::klein_9b(),
    }
}

/// Image pixels per transformer token side (the FLUX.2 VAE's).
fn pixels_per_token() -> usize {
    crate::model::vae::VaeConfig::default().pixel_multiple()
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let be = device::select_with(args.device, args.cpu_precision)?;
    let name = be.name();
    println!("device: {name}");
    let peak = spec_peak(&name);
    let rows = match args.suite {
        Suite::Gemm => bench_gemm(&*be, args, peak)?,
        Suite::Attention => bench_attention(&*be, args)?,
        Suite::Dit => bench_dit(be.clone(), args)?,
        Suite::Pipeline => bench_pipeline(be.clone(), args)?,
        Suite::Conv => bench_conv(&*be, args)?,
    };
    if let Some(path) = &args.json {
        let report = json!({"device": name, "suite": format!("{:?}", args.suite), "results": rows});
        crate::output_file::write_bytes(path, serde_json::to_string_pretty(&report).unwrap().as_bytes())?;
    }
    Ok(())
}

/// One block linear's weight in every form `bench gemm` times.
struct GemmWeights {
    k: usize,
    n: usize,
    bf16: Tensor,
    /// FP8 W8A8, weight-only int8 and GGUF Q4_K (random valid blocks): on the GPU, and on the CPU
    /// in bf16 precision (the codes dequantized in the GEMM's packing); the f32 CPU reference
    /// dequantizes at load, which times nothing new.
    quantized: Option<[crate::backend::QuantTensor; 3]>,
}

fn bench_gemm(be: &dyn Backend, args: &BenchArgs, peak: Option<(f64, f64)>) -> Result<Vec<serde_json::Value>> {
    let cfg = transformer_config(args.shapes);
    let (d, m) = (cfg.hidden(), cfg.mlp_hidden());
    let shapes = [(d, 3 * d), (d, d), (d, 2 * m), (m, d), (d, 3 * d + 2 * m), (d + m, d)];
    // Each weight once (quantizing on the host takes longer than timing it).
    let weights = shapes
        .iter()
        .map(|&(k, n)| -> Result<GemmWeights> {
            let wv: Vec<f32> = crate::rng::normal_vec(5, "w", n * k).iter().map(|v| v / (k as f32).sqrt()).collect();
            // The weight as a model loads it: bf16 (on the CPU in bf16 precision: kept as bf16).
            let bf16 = be.load_weight(&encode_from_f32(&wv, DType::BF16), DType::BF16, &[n, k])?;
            let quantized = if be.kind() == DeviceKind::Cpu && args.cpu_precision == CpuPrecision::F32 {
                None
            } else {
                let q4k = crate::quant::Quantized {
                    format: QuantFormat::Ggml(crate::weights::ggml::GgmlType::Q4K),
                    rows: n,
                    cols: k,
                    codes: crate::weights::ggml::synthetic_blocks(crate::weights::ggml::GgmlType::Q4K, n * k, 5),
                    scales: vec![],
                };
                Some([
                    be.load_quantized(&quantize(&wv, n, k, QuantFormat::Fp8)?)?,
                    be.load_quantized(&quantize(&wv, n, k, QuantFormat::Int8)?)?,
                    be.load_quantized(&q4k)?,
                ])
            };
            Ok(GemmWeights { k, n, bf16, quantized })
        })
        .collect::<Result<Vec<_>>>()?;
    // Where the GEMMs have a v3 (wgmma, sm_90a), v2 (mma.sync) is timed beside it in the same run;
    // on CUDA devices cuBLASLt too, where the library loads.
    let lt = load_baseline(be);
    println!(
        "{:>6} {:>6} {:>6}  {:>10} {:>9} {:>10} {:>9} {:>7} {:>10} {:>10} {:>11} {:>10} {:>13} {:>12} {:>14} {:>13} {:>10} {:>10}",
        "M",
        "K",
        "N",
        "bf16 ms",
        "TF/s",
        "fp8 ms",
        "TF/s",
        "fp8/bf16",
        "int8w ms",
        "q4_k ms",
        "bf16 v2 ms",
        "fp8 v2 ms",
        "bf16 tiles ms",
        "fp8 tiles ms",
        "bf16 narrow ms",
        "fp8 narrow ms",
        "lt bf16 ms",
        "lt fp8 ms"
    );
    let mut out = Vec::new();
    for &rows in &args.rows {
        for w in &weights {
            let (k, n) = (w.k, w.n);
            let x = random(be, "x", &[rows, k], 1.0)?;
            let flops = 2.0 * rows as f64 * k as f64 * n as f64;
            let t_bf16 = time(be, args.reps, || be.linear(&x, &w.bf16, None).map(|_| ()))?;
            let [t_fp8, t_int8, t_q4k] = match &w.quantized {
                None => [f64::NAN; 3],
                Some([fp8, int8, q4k]) => [
                    time(be, args.reps, || be.linear_fp8(&x, fp8, None).map(|_| ()))?,
                    time(be, args.reps, || be.linear_quantized(&x, int8, None).map(|_| ()))?,
                    time(be, args.reps, || be.linear_quantized(&x, q4k, None).map(|_| ()))?,
                ],
            };
            // v2 beside v3; and where v3 splits K by stream-K, v3 on whole tiles.
            let (bf16_shape, fp8_shape) = ((rows, n, 2 * k), (rows, n, k));
            let bf16_with = |kernels| {
                time_gemm_kernels(be, args.reps, kernels, bf16_shape, || be.linear(&x, &w.bf16, None).map(|_| ()))
            };
            let (v2_bf16, tiles_bf16) = (bf16_with(GemmKernels::V2)?, bf16_with(GemmKernels::WholeTiles)?);
            let narrow_bf16 = bf16_with(GemmKernels::Narrow)?;
            let fp8_with = |kernels| match &w.quantized {
                Some([fp8, ..]) => {
                    time_gemm_kernels(be, args.reps, kernels, fp8_shape, || be.linear_fp8(&x, fp8, None).map(|_| ()))
                }
                None => Ok(None),
            };
            let (v2_fp8, tiles_fp8) = (fp8_with(GemmKernels::V2)?, fp8_with(GemmKernels::WholeTiles)?);
            let narrow_fp8 = fp8_with(GemmKernels::Narrow)?;
            let fp8_w = w.quantized.as_ref().map(|[fp8, ..]| fp8);
            let (lt_bf16, lt_fp8) = time_baseline(be, args.reps, lt.as_ref(), &x, &w.bf16, fp8_w, (rows, n, k));
            let ms = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{:.3}", t * 1e3));
            let tf = |t: f64| flops / t / 1e12;
            let (r16, r8) = (tf(t_bf16), tf(t_fp8));
            println!(
                "{rows:>6} {k:>6} {n:>6}  {:>10.3} {r16:>9.1} {:>10.3} {r8:>9.1} {:>7.2} {:>10.3} {:>10.3} {:>11} {:>10} {:>13} {:>12} {:>14} {:>13} {:>10} {:>10}{}",
                t_bf16 * 1e3,
                t_fp8 * 1e3,
                t_bf16 / t_fp8,
                t_int8 * 1e3,
                t_q4k * 1e3,
                ms(v2_bf16),
                ms(v2_fp8),
                ms(tiles_bf16),
                ms(tiles_fp8),
                ms(narrow_bf16),
                ms(narrow_fp8),
                ms(lt_bf16),
                ms(lt_fp8),
                peak.map(|(p16, p8)| format!("  ({:.0}% / {:.0}% of spec)", 100.0 * r16 / p16, 100.0 * r8 / p8))
                    .unwrap_or_default()
            );
            out.push(json!({
                "m": rows, "k": k, "n": n,
                "bf16_ms": t_bf16 * 1e3, "bf16_tflops": r16,
                "fp8_ms": t_fp8 * 1e3, "fp8_tflops": r8,
                "int8_weight_only_ms": t_int8 * 1e3, "int8_weight_only_tflops": tf(t_int8),
                "gguf_q4_k_ms": t_q4k * 1e3, "gguf_q4_k_tflops": tf(t_q4k),
                "bf16_v2_ms": v2_bf16.map(|t| t * 1e3), "fp8_v2_ms": v2_fp8.map(|t| t * 1e3),
                "bf16_whole_tiles_ms": tiles_bf16.map(|t| t * 1e3), "fp8_whole_tiles_ms": tiles_fp8.map(|t| t * 1e3),
                "bf16_narrow_tiles_ms": narrow_bf16.map(|t| t * 1e3), "fp8_narrow_tiles_ms": narrow_fp8.map(|t| t * 1e3),
                "cublaslt_bf16_ms": lt_bf16.map(|t| t * 1e3), "cublaslt_fp8_ms": lt_fp8.map(|t| t * 1e3),
            }));
        }
    }
    Ok(out)
}

/// One convolution shape of the VAE decoder: (Cin, Cout, kernel side, height, width) and how many
/// times a decode runs it.
type ConvShape = ((usize, usize, usize, usize, usize), usize);

/// The decoder's convolutions (diffusers' `Decoder` of `AutoencoderKLFlux2`) for an image of
/// `width` x `height`: post_quant_conv, conv_in, the mid block's resnets, each up block's resnets
/// (a 1x1 shortcut where the channels change) and upsampler, conv_out; equal shapes merged.
fn vae_decoder_convs(cfg: &crate::model::vae::VaeConfig, width: usize, height: usize) -> Vec<ConvShape> {
    let channels: Vec<usize> = cfg.decoder_channels().iter().rev().copied().collect();
    let levels = channels.len();
    let down = 1 << (levels - 1);
    let (mut h, mut w) = (height / down, width / down);
    let mut convs: Vec<ConvShape> = Vec::new();
    let mut add = |shape: (usize, usize, usize, usize, usize)| match convs.iter_mut().find(|(s, _)| *s == shape) {
        Some((_, n)) => *n += 1,
        None => convs.push((shape, 1)),
    };
    let (latent, top) = (cfg.latent_channels, channels[0]);
    if cfg.use_post_quant_conv {
        add((latent, latent, 1, h, w));
    }
    add((latent, top, 3, h, w));
    for _ in 0..4 {
        add((top, top, 3, h, w)); // the mid block: two resnets of two convs
    }
    let mut prev = top;
    for (i, &out) in channels.iter().enumerate() {
        for r in 0..=cfg.layers_per_block {
            let cin = if r == 0 { prev } else { out };
            add((cin, out, 3, h, w));
            add((out, out, 3, h, w));
            if cin != out {
                add((cin, out, 1, h, w));
            }
        }
        prev = out;
        if i + 1 < levels {
            (h, w) = (2 * h, 2 * w);
            add((out, out, 3, h, w));
        }
    }
    add((prev, cfg.out_channels, 3, h, w));
    convs
}

/// `time` with convolutions of few output channels on v2 (the implicit GEMM) where the narrow
/// kernels would run; None on other backends or shapes.
fn time_conv_v2(be: &dyn Backend, reps: usize, cout: usize, f: impl FnMut() -> Result<()>) -> Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if cout <= 8 && be.as_any().downcast_ref::<crate::backend::cuda::CudaBackend>().is_some() {
        let set = crate::backend::cuda::CudaBackend::set_conv_v2;
        return crate::selftest::with_cuda_switch(be, set, || time(be, reps, f)).map(Some);
    }
    let _ = (be, reps, cout, f);
    Ok(None)
}

fn bench_conv(be: &dyn Backend, args: &BenchArgs) -> Result<Vec<serde_json::Value>> {
    let cfg = crate::model::vae::VaeConfig::default();
    let convs = vae_decoder_convs(&cfg, args.width, args.height);
    println!(
        "{:>5} {:>5} {:>2} {:>11} {:>6} {:>10} {:>9} {:>10} {:>12}",
        "Cin", "Cout", "k", "size", "runs", "ms", "TF/s", "v2 ms", "ms × runs"
    );
    let (mut rows, mut total) = (Vec::new(), 0.0);
    for ((cin, cout, k, h, w), runs) in convs {
        let x = random(be, "x", &[1, cin, h, w], 1.0)?;
        let wt = random(be, "w", &[cout, cin, k, k], 1.0 / ((cin * k * k) as f32).sqrt())?;
        let bias = random(be, "b", &[cout], 0.1)?;
        let pad = crate::backend::Padding2d::same(k / 2);
        let run = || be.conv2d(&x, &wt, Some(&bias), 1, pad).map(|_| ());
        let t = time(be, args.reps, run)?;
        let v2 = time_conv_v2(be, args.reps, cout, run)?;
        let flops = 2.0 * (cin * cout * k * k * h * w) as f64;
        total += t * runs as f64;
        let v2_ms = v2.map_or("-".to_string(), |t| format!("{:.3}", t * 1e3));
        println!(
            "{cin:>5} {cout:>5} {k:>2} {:>11} {runs:>6} {:>10.3} {:>9.1} {v2_ms:>10} {:>12.3}",
            format!("{h}x{w}"),
            t * 1e3,
            flops / t / 1e12,
            t * runs as f64 * 1e3
        );
        rows.push(json!({
            "cin": cin, "cout": cout, "kernel": k, "height": h, "width": w, "runs": runs,
            "ms": t * 1e3, "tflops": flops / t / 1e12, "v2_ms": v2.map(|t| t * 1e3),
        }));
    }
    println!("decoder convolutions at {}x{}: {:.2} ms", args.width, args.height, total * 1e3);
    Ok(rows)
}

fn bench_attention(be: &dyn Backend, args: &BenchArgs) -> Result<Vec<serde_json::Value>> {
    let cfg = transformer_config(args.shapes);
    let m = pixels_per_token();
    let n = MAX_TOKENS + (args.width / m) * (args.height / m);
    profile_attention(
        be,
        n,
        cfg.num_attention_heads,
        cfg.attention_head_dim,
        args.reps,
        false,
        AttentionInputs::Gaussian,
    )
}

/// What `flux2 profile attention` feeds the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttentionInputs {
    /// q and k as a DiT makes them: each head vector RMS-normalised, then scaled by a norm weight
    /// with a few outlier channels (8×); k also carries a per-channel offset shared by all tokens
    /// (what Sage's smoothing removes). v Gaussian.
    Dit,
    /// Independent N(0, 1) q, k, v.
    Gaussian,
}

/// q, k or v `[1, seq, heads, dim]` drawn as `inputs` says.
fn attention_input(be: &dyn Backend, name: &str, shape: [usize; 4], inputs: AttentionInputs) -> Result<Tensor> {
    let [_, seq, heads, dim] = shape;
    if inputs == AttentionInputs::Gaussian || name == "v" {
        return random(be, name, &shape, 1.0);
    }
    let z = crate::rng::normal_vec(5, name, seq * heads * dim);
    let per_channel = |what: &str| crate::rng::normal_vec(7, &format!("{name}.{what}"), heads * dim);
    let (gain, offset) = (per_channel("gain"), per_channel("offset"));
    // ~3% outlier channels at 8×, the rest 1 ± 0.2; k offsets N(0, 0.5²).
    let weight: Vec<f32> =
        gain.iter().enumerate().map(|(i, g)| if (i * 2654435761) % 97 < 3 { 8.0 } else { 1.0 + 0.2 * g }).collect();
    let shift: Vec<f32> = offset.iter().map(|o| if name == "k" { 0.5 * o } else { 0.0 }).collect();
    let mut x = vec![0.0f32; z.len()];
    for (row, out) in x.chunks_mut(dim).enumerate() {
        let h = row % heads;
        let src = &z[row * dim..(row + 1) * dim];
        let shifted: Vec<f32> = src.iter().zip(&shift[h * dim..(h + 1) * dim]).map(|(a, b)| a + b).collect();
        let rms = (shifted.iter().map(|v| v * v).sum::<f32>() / dim as f32 + 1e-6).sqrt();
        for ((o, v), w) in out.iter_mut().zip(&shifted).zip(&weight[h * dim..(h + 1) * dim]) {
            *o = v / rms * w;
        }
    }
    be.upload(&Tensor::from_f32(x, &shape)?, be.activation_dtype())
}

/// Time every attention path at (seq, heads, dim); with `accuracy`, compare each with f32 on the
/// CPU (cosine, relative L1).
pub fn profile_attention(
    be: &dyn Backend,
    seq: usize,
    heads: usize,
    dim: usize,
    reps: usize,
    accuracy: bool,
    inputs: AttentionInputs,
) -> Result<Vec<serde_json::Value>> {
    let shape = [1, seq, heads, dim];
    let q = attention_input(be, "q", shape, inputs)?;
    let k = attention_input(be, "k", shape, inputs)?;
    let v = attention_input(be, "v", shape, inputs)?;
    let scale = 1.0 / (dim as f32).sqrt();
    let ops = 4.0 * (seq as f64).powi(2) * dim as f64 * heads as f64;
    let reference = if accuracy {
        let cpu = CpuBackend::new();
        let host = |t: &Tensor| Tensor::from_f32(t.to_vec_f32()?, t.shape());
        Some(cpu.attention(&host(&q)?, &host(&k)?, &host(&v)?, &AttnMask::None, scale)?.to_vec_f32()?)
    } else {
        None
    };
    println!("attention N={seq} H={heads} D={dim}, {inputs:?} inputs");
    println!("{:<10} {:>10} {:>10} {:>10} {:>10}", "path", "ms", "TOPS", "cosine", "rel L1");
    let mut rows = Vec::new();
    // "exact-ref" / "sage-ref": the CUDA backend's previous kernels (flash v2, row-wise for wide heads,
    // row-wise Sage), the baselines of the current ones; "exact-v3" / "sage-v2": flash v3 and Sage v2
    // (mma.sync) where "exact" and "sage" run flash v4 and Sage v3 (wgmma, sm_90a images).
    use crate::selftest::{with_attention_kernels, AttnKernels};
    let cuda = crate::selftest::is_cuda(be);
    let hopper = crate::selftest::has_flash_v4(be);
    let paths: &[(&str, AttentionMode, AttnKernels)] = &[
        ("exact", AttentionMode::Exact, AttnKernels::Cur),
        ("exact-v3", AttentionMode::Exact, AttnKernels::MmaSync),
        ("exact-ref", AttentionMode::Exact, AttnKernels::Ref),
        ("sage", AttentionMode::Sage, AttnKernels::Cur),
        ("sage-v2", AttentionMode::Sage, AttnKernels::MmaSync),
        ("sage-ref", AttentionMode::Sage, AttnKernels::Ref),
    ];
    let shown = |mode: AttentionMode, k: AttnKernels| match (k, mode) {
        (AttnKernels::Cur, _) => true,
        (AttnKernels::Ref, _) => cuda,
        (AttnKernels::MmaSync, AttentionMode::Exact) => hopper && (dim == 64 || dim == 128),
        (AttnKernels::MmaSync, AttentionMode::Sage) => hopper && dim == 128,
    };
    // Sage takes head dims up to 256 (the VAE's 512-wide head has only the exact paths).
    let sage_ok = dim <= 256;
    for &(label, mode, kernels) in
        paths.iter().filter(|p| shown(p.1, p.2) && (sage_ok || !matches!(p.1, AttentionMode::Sage)))
    {
        let call = || {
            let run = || match mode {
                AttentionMode::Exact => be.attention(&q, &k, &v, &AttnMask::None, scale),
                AttentionMode::Sage => be.attention_sage(&q, &k, &v, &AttnMask::None, scale),
            };
            with_attention_kernels(be, kernels, run)
        };
        let t = time(be, reps, || call().map(|_| ()))?;
        let (cos, l1) = match &reference {
            Some(r) => {
                let o = call()?.to_vec_f32()?;
                let (cos, _, _) = super::compare::similarity(&o, r);
                let l1 = o.iter().zip(r).map(|(a, b)| (a - b).abs() as f64).sum::<f64>()
                    / r.iter().map(|b| b.abs() as f64).sum::<f64>();
                (Some(cos), Some(l1))
            }
            None => (None, None),
        };
        let fmt = |x: Option<f64>, p: usize| x.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
        println!("{:<10} {:>10.3} {:>10.1} {:>10} {:>10}", label, t * 1e3, ops / t / 1e12, fmt(cos, 6), fmt(l1, 4));
        rows.push(json!({"path": label, "ms": t * 1e3, "tops": ops / t / 1e12, "cosine": cos, "relative_l1": l1}));
    }
    Ok(rows)
}

fn bench_dit(be: std::sync::Arc<dyn Backend>, args: &BenchArgs) -> Result<Vec<serde_json::Value>> {
    let model = args
        .model
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("bench dit needs --model (e.g. a `flux2 synth` folder)".into()))?;
    let m = pixels_per_token();
    let (h, w, lt) = (args.height / m, args.width / m, MAX_TOKENS);
    // `graph ms`: the same forward replayed from a recording (CUDA graphs), as the denoising loop
    // runs it from its third step on; "-" where the backend does not record.
    println!("{:<14} {:>10} {:>10} {:>10}", "mode", "ms/forward", "TFLOP/s", "graph ms");
    let mut rows = Vec::new();
    // One load per precision; the attention mode switches on the loaded model.
    // On the CPU the FP8 and Sage paths are exact emulations (references, not fast paths): only
    // the bf16 forward is timed there.
    let modes: &[(TransformerPrecision, &[AttentionMode])] = match be.kind() {
        DeviceKind::Cpu => &[(TransformerPrecision::Bf16, &[AttentionMode::Exact])],
        _ => &[
            (TransformerPrecision::Bf16, &[AttentionMode::Exact]),
            (TransformerPrecision::Fp8, &[AttentionMode::Exact, AttentionMode::Sage]),
        ],
    };
    for &(precision, attentions) in modes {
        let compute = Compute { precision: Some(precision), attention: AttentionMode::Exact };
        let mut model = Flux2Transformer::load_with(be.clone(), model, None, compute)?;
        let cfg = model.config().clone();
        let x = random(&*be, "x", &[1, h * w, cfg.in_channels], 1.0)?;
        let ctx = random(&*be, "ctx", &[1, lt, cfg.joint_attention_dim], 1.0)?;
        let t = scale_in_dtype(&[0.9], 1000.0, be.activation_dtype());
        let (img, txt) = (PositionIds::image(0.0, h, w), PositionIds::text(lt));
        // Every block does (4·D² + 3·D·M) multiply-adds per token in its linears (both streams of a
        // double block together cover all tokens) and 4·N²·D flops of attention.
        let (d, mm, n) = (cfg.hidden() as f64, cfg.mlp_hidden() as f64, (lt + h * w) as f64);
        let blocks = (cfg.num_layers + cfg.num_single_layers) as f64;
        let flops = 2.0 * n * (4.0 * d * d + 3.0 * d * mm) * blocks + blocks * 4.0 * n * n * d;
        for &attention in attentions {
            model.set_attention(attention);
            let secs = time(&*be, args.reps, || model.forward(&x, &ctx, &t, &img, &txt, None).map(|_| ()))?;
            // Timed after `time`'s two warm-up calls: the eager first step and the recording.
            let mut steps = Steps::new(&model, &ctx, &img, &txt, None, true);
            let replayed = time(&*be, args.reps, || steps.forward(&x, &t, None).map(|_| ()))?;
            let graph = steps.replaying().then_some(replayed * 1e3);
            let label = format!("{precision:?}/{attention:?}").to_lowercase();
            let graph_text = graph.map_or("-".into(), |ms| format!("{ms:.2}"));
            println!("{label:<14} {:>10.2} {:>10.1} {graph_text:>10}", secs * 1e3, flops / secs / 1e12);
            rows.push(json!({"mode": label, "ms": secs * 1e3, "tflops": flops / secs / 1e12, "graph_ms": graph}));
        }
    }
    Ok(rows)
}

fn bench_pipeline(be: std::sync::Arc<dyn Backend>, args: &BenchArgs) -> Result<Vec<serde_json::Value>> {
    let model = args
        .model
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("bench pipeline needs --model (a pipeline folder)".into()))?;
    let pipe = crate::pipeline::Pipeline::load(be.clone(), model)?;
    let req = crate::pipeline::Request {
        prompt: "a photo of a red fox in the snow".into(),
        width: Some(args.width),
        height: Some(args.height),
        seed: 1,
        ..Default::default()
    };
    let mut rows = Vec::new();
    for i in 0..args.reps.clamp(2, 5) {
        let start = Instant::now();
        let encoded = pipe.encode(&req.prompt, pipe.info.uses_cfg(req.guidance))?;
        be.synchronize()?;
        let encode = start.elapsed().as_secs_f64();
        let out = pipe.generate(&req, Some(&encoded), None)?;
        let total = start.elapsed().as_secs_f64();
        println!(
            "run {i}: encode {:.0} ms, denoise {:.0} ms ({:.1} ms/step), decode {:.0} ms, total {:.0} ms",
            encode * 1e3,
            out.timings.denoise.as_secs_f64() * 1e3,
            out.timings.denoise.as_secs_f64() * 1e3 / out.steps as f64,
            out.timings.decode.as_secs_f64() * 1e3,
            total * 1e3
        );
        rows.push(json!({"encode_ms": encode * 1e3, "denoise_ms": out.timings.denoise.as_secs_f64() * 1e3, "decode_ms": out.timings.decode.as_secs_f64() * 1e3, "total_ms": total * 1e3}));
    }
    rows.push(bench_kv(&pipe, &*be, args)?);
    Ok(rows)
}

/// The KV scheme's speedup: one denoising step with reference tokens run through the DiT (the
/// standard editing step) against a step that reuses their cached K/V, and the first (extract)
/// step that fills the cache; `--kv-refs` references of the output size.
fn bench_kv(pipe: &crate::pipeline::Pipeline, be: &dyn Backend, args: &BenchArgs) -> Result<serde_json::Value> {
    let refs = args.kv_refs.clamp(1, crate::limits::MAX_REFERENCES);
    let m = pipe.pixel_multiple();
    let (h, w) = (args.height / m, args.width / m);
    let image = crate::image_io::RgbImage {
        width: args.width,
        height: args.height,
        data: (0..args.width * args.height * 3).map(|i| ((i * 37) % 251) as u8).collect(),
    };
    let references = pipe.prepare_references(&vec![image; refs])?.expect("references");
    let encoded = pipe.encode("a photo of a red fox in the snow", false)?;
    let transformer = pipe.transformer()?;
    let c = transformer.config().in_channels;
    let act = be.activation_dtype();
    let latents = be.upload(&crate::pipeline::seeded_noise(1, &[1, h * w, c])?, act)?;
    let img_ids = PositionIds::image(0.0, h, w);
    let txt_ids = PositionIds::text(encoded.context.dim(1));
    let all_ids = PositionIds::concat(&[&img_ids, &references.ids])?;
    let t = [500.0f32];
    let reps = args.reps.clamp(1, 5);
    let input = be.concat(&[&latents, &references.tokens], 1)?;
    let standard =
        time(be, reps, || transformer.forward(&input, &encoded.context, &t, &all_ids, &txt_ids, None).map(|_| ()))?;
    let extract_start = Instant::now();
    let (_, cache) = transformer.forward_kv_extract(
        &latents,
        &references.tokens,
        &encoded.context,
        &t,
        &img_ids,
        &references.ids,
        &txt_ids,
        0.0,
    )?;
    be.synchronize()?;
    let extract = extract_start.elapsed().as_secs_f64();
    let cached = time(be, reps, || {
        transformer.forward_kv_cached(&latents, &encoded.context, &t, &img_ids, &txt_ids, &cache).map(|_| ())
    })?;
    // The cached step as the denoising loop runs it from its third cached step: from a CUDA graph.
    let mut steps = Steps::new(&transformer, &encoded.context, &img_ids, &txt_ids, Some(&cache), true);
    let replayed = time(be, reps, || steps.forward(&latents, &t, None).map(|_| ()))?;
    let graph_ms = steps.replaying().then_some(replayed * 1e3);
    drop(steps);
    let speedup = standard / cached;
    println!(
        "KV cache, {refs} reference(s) of {}x{}: a step with the reference tokens {:.1} ms, with their cached K/V \
         {:.1} ms ({speedup:.2}x; {} from a CUDA graph); the first step (extract) {:.1} ms; cache {:.1} MiB",
        args.width,
        args.height,
        standard * 1e3,
        cached * 1e3,
        graph_ms.map_or("not replayed".into(), |ms| format!("{ms:.1} ms")),
        extract * 1e3,
        cache.bytes() as f64 / 1048576.0
    );
    Ok(json!({
        "kv_cache": {
            "references": refs,
            "reference_step_ms": standard * 1e3,
            "cached_step_ms": cached * 1e3,
            "cached_graph_step_ms": graph_ms,
            "extract_step_ms": extract * 1e3,
            "speedup": speedup,
            "cache_bytes": cache.bytes(),
        }
    }))
}

#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    /// What to profile (attention).
    pub what: String,
    #[arg(long, default_value_t = 4608)]
    pub seq: usize,
    #[arg(long, default_value_t = 24)]
    pub heads: usize,
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// gemm suite: the token counts (rows) to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [512, 4096, 4608])]
    pub rows: Vec<usize>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// The q/k/v generator: dit (RMS-normed q/k with outlier channels, k offsets) or gaussian.
    #[arg(long, value_enum, default_value_t = AttentionInputs::Dit)]
    pub inputs: AttentionInputs,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run_profile(args: &ProfileArgs) -> Result<()> {
    if args.what != "attention" {
        return Err(Error::InvalidArgument(format!("`{}`: only `flux2 profile attention` exists", args.what)));
    }
    let be = device::select(args.device)?;
    println!("device: {}", be.name());
    let rows = profile_attention(&*be, args.seq, args.heads, args.dim, args.reps, true, args.inputs)?;
    if let Some(path) = &args.json {
        let inputs = format!("{:?}", args.inputs).to_lowercase();
        let report = json!({"device": be.name(), "inputs": inputs, "results": rows});
        crate::output_file::write_bytes(path, serde_json::to_string_pretty(&report).unwrap().as_bytes())?;
    }
    Ok(())
}
