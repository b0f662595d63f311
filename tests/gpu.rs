//! CUDA backend checks: every op against the CPU reference (poisoned outputs), and the models on
//! the committed fixtures against diffusers. Without a usable GPU every check is reported as
//! ignored (visibly, by its own harness); .verify/gpu_check.sh runs this binary on a GPU machine.

mod common;

use std::sync::Arc;

use common::{cosine_and_rel_l2, fixtures, load};
use flux2::model::transformer::Flux2Transformer;
use flux2::pipeline::Pipeline;
use flux2::Backend;

fn every_op_matches_the_cpu_reference(be: Arc<dyn Backend>) {
    flux2::device::as_cuda(&be).unwrap().set_poison(true);
    let outcomes = flux2::selftest::run(&*be, "", 1);
    println!("{}", flux2::selftest::table(&outcomes));
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.passed).map(|o| format!("{} {}", o.op, o.shape)).collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
}

fn transformer_fixtures_in_bf16(be: Arc<dyn Backend>) {
    for case in ["t2i_nonsquare", "batch2_hd24_ref", "guidance_outchannels"] {
        let dir = fixtures().join("transformer").join(case);
        for model_path in [dir.clone(), dir.join("bfl.safetensors")] {
            let model = Flux2Transformer::load(be.clone(), &model_path).unwrap();
            let out = common::forward_case(&model, &dir, "inputs.safetensors");
            let want = load(&dir.join("expected.safetensors"), "sample").to_vec_f32().unwrap();
            let (cos, rel) = cosine_and_rel_l2(&out, &want);
            println!("transformer {case} ({}): cosine {cos:.6}, rel_l2 {rel:.2e}", model_path.display());
            assert!(cos >= 0.999 && rel <= 0.05, "{case}: cosine {cos}, rel_l2 {rel}");
        }
    }
}

/// Every checkpoint format users run (GGUF blocks, ComfyUI fp8/nvfp4/int8 files), decoded on the
/// host into the device's bf16, and the fp8 file's own codes on the FP8 GEMM.
fn checkpoint_formats_in_bf16(be: Arc<dyn Backend>) {
    common::checkpoint_formats_in_bf16(be);
}

fn pipeline_images_within_2_of_255(be: Arc<dyn Backend>) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    for case in common::pipeline_cases() {
        let mad = common::pipeline_case_error(&be, &case, &base);
        let dir = &case.dir;
        println!("pipeline {}: mean absolute pixel error {mad:.3}/255", dir.display());
        assert!(mad <= 2.0, "{}: {mad}", dir.display());
    }
}

/// Inpainting, img2img and the KV reference cache (tests/fixtures/workflows, from diffusers in
/// float32) within the same 2/255 as the text-to-image pipeline cases.
fn workflows_within_2_of_255(be: Arc<dyn Backend>) {
    let pipe = Pipeline::load(be, &fixtures().join("pipeline")).unwrap();
    for case in common::workflows::cases("inpaint").into_iter().chain(common::workflows::cases("kv")) {
        let prepared = pipe.prepare_references(&case.references()).unwrap();
        let request = flux2::pipeline::Request {
            timestep_mode: Some(flux2::sampler::TimestepMode::DiffusersF32),
            kv_cache: case.json["pipeline"] == "kv",
            ..case.request()
        };
        let out = pipe.generate(&request, None, prepared.as_ref()).unwrap();
        let mad = common::mean_pixel_error(&out.image, &case.expected_image());
        println!("workflow {}: mean absolute pixel error {mad:.3}/255", case.name);
        assert!(mad <= 2.0, "{}: {mad}", case.name);
    }
}

fn components_in_bf16(be: Arc<dyn Backend>) {
    let c = fixtures().join("components");
    let p = fixtures().join("pipeline");
    let act = be.activation_dtype();
    let enc = flux2::model::qwen3::Qwen3TextEncoder::load(
        be.clone(),
        &p.join("text_encoder"),
        &flux2::model::qwen3::KLEIN_OUT_LAYERS,
    )
    .unwrap();
    let tok = flux2::model::tokenizer::PromptTokenizer::load(&p.join("tokenizer")).unwrap();
    let embeds = enc.encode_prompts(&tok, &["a red fox in the snow", "一只猫"]).unwrap();
    let (cos, rel) = cosine_and_rel_l2(
        &embeds.to_vec_f32().unwrap(),
        &load(&c.join("text_encoder_expected.safetensors"), "prompt_embeds").to_vec_f32().unwrap(),
    );
    println!("text encoder: cosine {cos:.6}, rel_l2 {rel:.2e}");
    assert!(cos >= 0.999, "text encoder cosine {cos}");

    let vae = flux2::model::vae::Vae::load(
        be.clone(),
        &p.join("vae"),
        flux2::model::vae::VaeParts { encoder: true, decoder: true },
    )
    .unwrap();
    let img = be.upload(&load(&c.join("vae_encode_inputs.safetensors"), "image"), act).unwrap();
    let latent = vae.encode(&img).unwrap();
    let (cos, rel) = cosine_and_rel_l2(
        &latent.to_vec_f32().unwrap(),
        &load(&c.join("vae_encode_expected.safetensors"), "latent").to_vec_f32().unwrap(),
    );
    println!("vae encode: cosine {cos:.6}, rel_l2 {rel:.2e}");
    assert!(cos >= 0.999, "vae encode cosine {cos}");
    let z = be.upload(&load(&c.join("vae_decode_inputs.safetensors"), "latents"), act).unwrap();
    let sample = vae.decode(&z).unwrap();
    let (cos, rel) = cosine_and_rel_l2(
        &sample.to_vec_f32().unwrap(),
        &load(&c.join("vae_decode_expected.safetensors"), "sample").to_vec_f32().unwrap(),
    );
    println!("vae decode: cosine {cos:.6}, rel_l2 {rel:.2e}");
    assert!(cos >= 0.999, "vae decode cosine {cos}");
}

fn quantized_linears_reject_bad_shapes(be: Arc<dyn Backend>) {
    // The 8-bit launchers index the weight by its stored [rows, cols]: a wrong input or bias must be
    // refused before any kernel reads past it.
    use flux2::quant::{quantize, QuantFormat};
    let act = be.activation_dtype();
    let up = |v: Vec<f32>, shape: &[usize]| be.upload(&common::t(&v, shape), act).unwrap();
    let (x, bad_x) = (up(vec![0.5; 2 * 32], &[2, 32]), up(vec![0.5; 2 * 31], &[2, 31]));
    let (bias, bad_bias) = (up(vec![0.1; 6], &[6]), up(vec![0.1; 5], &[5]));
    let w: Vec<f32> = (0..6 * 32).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
    for format in [QuantFormat::Int8, QuantFormat::Int4 { group: 32 }, QuantFormat::Fp8] {
        let q = be.load_quantized(&quantize(&w, 6, 32, format).unwrap()).unwrap();
        let linear = |x: &flux2::Tensor, b: Option<&flux2::Tensor>| match format {
            QuantFormat::Fp8 => be.linear_fp8(x, &q, b),
            _ => be.linear_quantized(x, &q, b),
        };
        assert_eq!(linear(&x, Some(&bias)).unwrap().shape(), &[2, 6], "{format:?}");
        let e = linear(&x, Some(&bad_bias)).unwrap_err().to_string();
        assert!(e.contains("bias [5]"), "{format:?}: {e}");
        let e = linear(&bad_x, None).unwrap_err().to_string();
        assert!(e.contains("[2, 31]") && e.contains("[6, 32]"), "{format:?}: {e}");
        if format != QuantFormat::Fp8 {
            let e = be.linear_fp8(&x, &q, None).unwrap_err().to_string();
            assert!(e.contains("not fp8"), "{format:?}: {e}");
        }
    }
}

fn an_overflow_stops_the_pipeline_with_the_step(be: Arc<dyn Backend>) {
    // Finite noise so large that the first step overflows bf16: the device-side health check must
    // stop the run at step 1, not decode a black image.
    let pipe = Pipeline::load(be, &fixtures().join("pipeline")).unwrap();
    let noise = flux2::Tensor::from_f32(vec![3.0e38; 16 * 2 * 2], &[1, 16, 2, 2]).unwrap();
    let request =
        flux2::pipeline::Request { prompt: "a cat".into(), steps: Some(2), noise: Some(noise), ..Default::default() };
    match pipe.generate(&request, None, None) {
        Err(flux2::Error::NonFinite(m)) => assert!(m.contains("after denoising step 1 of 2"), "{m}"),
        Err(e) => panic!("expected a non-finite error, got {e}"),
        Ok(_) => panic!("an overflowing run produced an image"),
    }
}

fn no_gpu_gives_a_clear_error_or_a_working_device(_: Arc<dyn Backend>) {
    // Without a driver, --device cuda must fail with a sentence, and auto must fall back.
    match flux2::device::select(flux2::device::DeviceChoice::Cuda) {
        Ok(be) => assert_eq!(be.kind(), flux2::tensor::DeviceKind::Cuda),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("cuda") || msg.contains("CUDA") || msg.contains("GPU"), "{msg}");
            let auto = flux2::device::select(flux2::device::DeviceChoice::Auto).unwrap();
            assert_eq!(auto.kind(), flux2::tensor::DeviceKind::Cpu);
        }
    }
}

/// FLUX2_EXPECT_GPU=1 (set by .verify/gpu_check.sh): a CUDA device must be there, so a device
/// that does not initialise fails the GPU checks instead of leaving them ignored.
/// LoRAs merged into bf16 device weights and applied unmerged (two `linear`s and an `axpby` per
/// adapted linear): both close to diffusers + peft in f32.
fn loras_in_bf16(be: Arc<dyn Backend>) {
    use flux2::lora::{LoraMode, LoraOptions, LoraSpec};
    let dir = fixtures().join("transformer/t2i_nonsquare");
    let want = load(&fixtures().join("lora/expected.safetensors"), "two").to_vec_f32().unwrap();
    let loras = [("bfl", 0.7), ("diffusers", -0.4)]
        .map(|(n, s)| LoraSpec { path: fixtures().join(format!("lora/{n}.safetensors")), scale: s })
        .to_vec();
    for mode in [LoraMode::Merge, LoraMode::Runtime] {
        let options = LoraOptions { loras: loras.clone(), mode };
        let compute = flux2::model::transformer::Compute::default();
        let model = Flux2Transformer::load_with_loras(be.clone(), &dir, None, compute, &options).unwrap();
        let out = common::forward_case(&model, &dir, "inputs.safetensors");
        let (cos, rel) = cosine_and_rel_l2(&out, &want);
        println!("two LoRAs ({mode:?}): cosine {cos:.6}, rel_l2 {rel:.2e}");
        assert!(cos >= 0.999 && rel <= 0.05, "{mode:?}: cosine {cos}, rel_l2 {rel}");
    }
    // LoKr at run time: its dense delta path.
    let want = load(&fixtures().join("lora/expected.safetensors"), "lokr").to_vec_f32().unwrap();
    let lokr = LoraSpec { path: fixtures().join("lora/lokr.safetensors"), scale: 1.0 };
    let options = LoraOptions { loras: vec![lokr], mode: LoraMode::Runtime };
    let compute = flux2::model::transformer::Compute::default();
    let model = Flux2Transformer::load_with_loras(be, &dir, None, compute, &options).unwrap();
    let (cos, rel) = cosine_and_rel_l2(&common::forward_case(&model, &dir, "inputs.safetensors"), &want);
    println!("LoKr (Runtime): cosine {cos:.6}, rel_l2 {rel:.2e}");
    assert!(cos >= 0.999 && rel <= 0.05, "LoKr: cosine {cos}, rel_l2 {rel}");
}

fn sage_quantize_v2_gives_v1s_bits(be: Arc<dyn Backend>) {
    // The one-pass Q/K pre-pass (v2) and its two-launch reference (v1) compute the same scales and
    // codes, so the attention after them is bit-identical; also for inputs that are views at an odd
    // offset (16-byte loads impossible: v1 runs).
    use flux2::backend::AttnMask;
    let cuda = flux2::device::as_cuda(&be).unwrap();
    let act = be.activation_dtype();
    let (b, n, h, hkv) = (2, 130, 4, 2);
    for d in [64, 128] {
        let draw = |name: &str, heads: usize, extra: usize| {
            let v = flux2::rng::normal_vec(17, name, b * n * heads * d + extra);
            be.upload(&common::t(&v, &[b * n * heads * d + extra]), act).unwrap()
        };
        let mask = AttnMask::Causal { valid_len: Some(vec![n, 77]) };
        let (q, k, v) = (draw("q", h, 1), draw("k", hkv, 1), draw("v", hkv, 1));
        for offset in [0, 1] {
            let view = |t: &flux2::Tensor, heads: usize| {
                t.narrow(0, offset, b * n * heads * d).unwrap().reshape(&[b, n, heads, d]).unwrap()
            };
            let (q, k, v) = (view(&q, h), view(&k, hkv), view(&v, hkv));
            let run = || be.attention_sage(&q, &k, &v, &mask, 0.125).unwrap().to_vec_f32().unwrap();
            let v2 = run();
            cuda.set_sage_quantize_v1(true);
            let v1 = run();
            cuda.set_sage_quantize_v1(false);
            assert!(v2.iter().all(|x| x.is_finite()), "d {d} offset {offset}");
            assert_eq!(v1, v2, "d {d} offset {offset}: v2 differs from v1");
        }
    }
}

fn sage_normed_gives_the_compositions_bits(be: Arc<dyn Backend>) {
    // attention_sage_normed's fused pre-pass (sage_norm_rope_int8: q and k normed, rotated and
    // quantized without a bf16 copy) against its composition (rms_norm_rope per part, concat,
    // attention_sage) on the same device: the same bf16 values, sums, scales and codes, so the
    // same output bits. One part (a single block's projection, GQA) and two (a double block's text
    // and image streams with their own weights, a scale block straddling them), d 64 and 128.
    use flux2::backend::{attention_sage_normed_composed, QkPart, QkRope, RopePairs};
    let act = be.activation_dtype();
    let draw = |name: &str, shape: &[usize], dtype| {
        let v = flux2::rng::normal_vec(23, name, shape.iter().product());
        be.upload(&common::t(&v, shape), dtype).unwrap()
    };
    for (b, lens, h, hkv, d) in
        [(2usize, vec![150usize], 4usize, 2usize, 128usize), (2, vec![40, 90], 2, 2, 64), (1, vec![70, 60], 2, 2, 128)]
    {
        let n: usize = lens.iter().sum();
        let width = (h + 2 * hkv) * d;
        let proj: Vec<_> =
            lens.iter().enumerate().map(|(i, &l)| draw(&format!("proj{i}"), &[b, l, width], act)).collect();
        let slice = |x: &flux2::Tensor, at: usize, heads: usize| {
            x.narrow(2, at * d, heads * d).unwrap().reshape(&[b, x.dim(1), heads, d]).unwrap()
        };
        let q: Vec<_> = proj.iter().map(|p| slice(p, 0, h)).collect();
        let k: Vec<_> = proj.iter().map(|p| slice(p, h, hkv)).collect();
        let vs: Vec<_> = proj.iter().map(|p| slice(p, h + hkv, hkv)).collect();
        // One part: v read in place from the projection; two: concatenated as the double block does.
        let v = if vs.len() == 1 { vs[0].clone() } else { be.concat(&vs.iter().collect::<Vec<_>>(), 1).unwrap() };
        let w: Vec<_> = (0..2 * lens.len()).map(|i| draw(&format!("w{i}"), &[d], act)).collect();
        let (cos, sin) = (draw("cos", &[n, d / 2], flux2::DType::F32), draw("sin", &[n, d / 2], flux2::DType::F32));
        let qp: Vec<_> = q.iter().enumerate().map(|(i, x)| QkPart { x, weight: &w[2 * i] }).collect();
        let kp: Vec<_> = k.iter().enumerate().map(|(i, x)| QkPart { x, weight: &w[2 * i + 1] }).collect();
        let rope = QkRope { eps: 1e-6, cos: &cos, sin: &sin, pairs: RopePairs::Interleaved };
        let scale = 1.0 / (d as f32).sqrt();
        let fused = be.attention_sage_normed(&qp, &kp, &rope, &v, scale).unwrap().to_vec_f32().unwrap();
        let composed = attention_sage_normed_composed(&*be, &qp, &kp, &rope, &v, scale).unwrap().to_vec_f32().unwrap();
        assert!(fused.iter().all(|x| x.is_finite()), "{lens:?} d {d}");
        assert_eq!(fused, composed, "{lens:?} d {d}: the fused pre-pass differs from the composition");
    }
}

fn attention_fp8_out_gives_the_compositions_bits(be: Arc<dyn Backend>) {
    // attention_sage_normed_linear_fp8_gated_add's (and attention_linear_fp8_gated_add's) fused path (the attention kernel writes the e4m3
    // rows of its output: each head's block max-reduces its rows' |max|, the block completing a query
    // tile quantizes it) against its composition (attention_sage_normed, then linear_fp8_gated_add
    // per part, which quantizes the stored bf16 output): the same codes and scales, so the same
    // GEMMs and the same bits. Sage v3 (sm_90a) and v2 at d 128, v2 at d 64; flash v4 (sm_90a) and v3
    // at d 64 and 128; two samples, splits inside and at the edge of a 128-query tile, ragged last
    // tiles, more heads than one.
    use flux2::backend::{
        attention_linear_fp8_composed, attention_sage_normed_linear_fp8_composed, GatedFp8, QkPart, QkRope, RopePairs,
    };
    use flux2::selftest::{with_attention_kernels, AttnKernels};
    let act = be.activation_dtype();
    let draw = |name: &str, shape: &[usize], dtype| {
        let v = flux2::rng::normal_vec(29, name, shape.iter().product());
        be.upload(&common::t(&v, shape), dtype).unwrap()
    };
    let cases = [
        (1usize, [70usize, 60usize], 2usize, 128usize, 64usize, AttnKernels::Cur),
        (2, [128, 200], 3, 128, 96, AttnKernels::Cur),
        (2, [128, 200], 3, 128, 96, AttnKernels::MmaSync),
        (2, [40, 90], 2, 64, 48, AttnKernels::Cur),
        (2, [40, 90], 2, 64, 48, AttnKernels::MmaSync),
    ];
    for (b, lens, h, d, n, kernels) in cases {
        let (nq, cols) = (lens[0] + lens[1], h * d);
        let proj: Vec<_> = (0..2).map(|i| draw(&format!("proj{i}"), &[b, lens[i], 3 * cols], act)).collect();
        let slice =
            |x: &flux2::Tensor, at: usize| x.narrow(2, at * cols, cols).unwrap().reshape(&[b, x.dim(1), h, d]).unwrap();
        let q: Vec<_> = proj.iter().map(|p| slice(p, 0)).collect();
        let k: Vec<_> = proj.iter().map(|p| slice(p, 1)).collect();
        let v = be.concat(&[&slice(&proj[0], 2), &slice(&proj[1], 2)], 1).unwrap();
        let w: Vec<_> = (0..4).map(|i| draw(&format!("w{i}"), &[d], act)).collect();
        let (cos, sin) = (draw("cos", &[nq, d / 2], flux2::DType::F32), draw("sin", &[nq, d / 2], flux2::DType::F32));
        let qp = [QkPart { x: &q[0], weight: &w[0] }, QkPart { x: &q[1], weight: &w[2] }];
        let kp = [QkPart { x: &k[0], weight: &w[1] }, QkPart { x: &k[1], weight: &w[3] }];
        let rope = QkRope { eps: 1e-6, cos: &cos, sin: &sin, pairs: RopePairs::Interleaved };
        let residual: Vec<_> = (0..2).map(|i| draw(&format!("x{i}"), &[b, lens[i], n], act)).collect();
        let gate: Vec<_> = (0..2).map(|i| draw(&format!("gate{i}"), &[b, n], act)).collect();
        let weights: Vec<_> = (0..2)
            .map(|i| {
                let w: Vec<f32> = flux2::rng::normal_vec(31, &format!("proj_w{i}"), n * cols)
                    .iter()
                    .map(|v| v / (cols as f32).sqrt())
                    .collect();
                be.load_quantized(&flux2::quant::quantize(&w, n, cols, flux2::quant::QuantFormat::Fp8).unwrap())
                    .unwrap()
            })
            .collect();
        let outs = [
            GatedFp8 { x: &residual[0], gate: &gate[0], w: &weights[0] },
            GatedFp8 { x: &residual[1], gate: &gate[1], w: &weights[1] },
        ];
        let scale = 1.0 / (d as f32).sqrt();
        let run = |fused: bool| {
            let out = with_attention_kernels(&*be, kernels, || {
                let [a, c] = if fused {
                    be.attention_sage_normed_linear_fp8_gated_add(&qp, &kp, &rope, &v, scale, outs)?
                } else {
                    attention_sage_normed_linear_fp8_composed(&*be, &qp, &kp, &rope, &v, scale, outs)?
                };
                be.concat(&[&a, &c], 1)
            });
            out.unwrap().to_vec_f32().unwrap()
        };
        let (fused, composed) = (run(true), run(false));
        let what = format!("B{b} L{lens:?} H{h} D{d} {kernels:?}");
        assert!(fused.iter().all(|x| x.is_finite()), "{what}: non-finite output");
        assert_eq!(fused, composed, "{what}: the attention kernel's e4m3 rows differ from the quantize pass");
        // Exact attention (flash v3, v4 on sm_90a) of the raw q and k, the same way.
        let (qe, ke) = (be.concat(&[&q[0], &q[1]], 1).unwrap(), be.concat(&[&k[0], &k[1]], 1).unwrap());
        let run = |fused: bool| {
            let out = with_attention_kernels(&*be, kernels, || {
                let [a, c] = if fused {
                    be.attention_linear_fp8_gated_add(&qe, &ke, &v, scale, outs)?
                } else {
                    attention_linear_fp8_composed(&*be, &qe, &ke, &v, scale, outs)?
                };
                be.concat(&[&a, &c], 1)
            });
            out.unwrap().to_vec_f32().unwrap()
        };
        let (fused, composed) = (run(true), run(false));
        assert!(fused.iter().all(|x| x.is_finite()), "exact {what}: non-finite output");
        assert_eq!(fused, composed, "exact {what}: flash attention's e4m3 rows differ from the quantize pass");
    }
}

fn fp8_double_blocks_at_head_dim_128_stay_close_to_the_cpu(be: Arc<dyn Backend>) {
    // The DiT with FP8 block linears at a head dim the tensor-core attention takes (128): its double
    // blocks run the attention kernels that write the output projections' e4m3 rows (Sage and exact),
    // wired through the model's text/image split and gates. A random-weight transformer of the
    // fixture's shape but 2 heads of 128, on the device against the f32 CPU in the same mode, and bit
    // for bit against the device's composition. (The model's wiring itself, shared by every backend,
    // is checked against diffusers by tests/quantized_compute.rs.)
    use flux2::model::transformer::config::TransformerConfig;
    use flux2::model::transformer::layout::Layout;
    use flux2::model::transformer::{AttentionMode, Compute};
    use flux2::planner::TransformerPrecision;
    let dir = fixtures().join("transformer/t2i_nonsquare");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("transformer/config.json")).unwrap()).unwrap();
    json["attention_head_dim"] = 128.into();
    json["axes_dims_rope"] = serde_json::json!([32, 32, 32, 32]);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(&config, json.to_string()).unwrap();
    let cfg = TransformerConfig::from_json_file(&config).unwrap();
    flux2::synth::write_transformer(&cfg, Layout::Diffusers, flux2::DType::BF16, 7, tmp.path(), "").unwrap();
    let model_dir = tmp.path().join("transformer");
    let inputs = dir.join("inputs.safetensors");
    let (img_ids, txt_ids) = (common::position_ids(&inputs, "img_ids"), common::position_ids(&inputs, "txt_ids"));
    let run = |be: Arc<dyn Backend>, attention| {
        let compute = Compute { precision: Some(TransformerPrecision::Fp8), attention };
        let model = Flux2Transformer::load_with(be.clone(), &model_dir, None, compute).unwrap();
        let act = be.activation_dtype();
        let hidden = be.upload(&load(&inputs, "hidden_states"), act).unwrap();
        let context = be.upload(&load(&inputs, "encoder_hidden_states"), act).unwrap();
        let times = vec![700.0; hidden.dim(0)];
        model.forward(&hidden, &context, &times, &img_ids, &txt_ids, None).unwrap().to_vec_f32().unwrap()
    };
    // The NaN-checking wrapper (`--debug-nans`) forwards each op to the device but leaves the fused
    // attention + projection ops (and the fused Sage pre-pass) to their compositions, which give the
    // same bits on the device (tests above): the whole forward must too.
    let composed: Arc<dyn Backend> = Arc::new(flux2::backend::nan_check::NanCheckBackend::new(be.clone()));
    let cpu: Arc<dyn Backend> = Arc::new(flux2::backend::cpu::CpuBackend::new());
    for attention in [AttentionMode::Exact, AttentionMode::Sage] {
        let (got, want) = (run(be.clone(), attention), run(cpu.clone(), attention));
        let (cos, rel) = cosine_and_rel_l2(&got, &want);
        println!("fp8 / {attention:?}, head dim 128: cosine {cos:.6}, rel_l2 {rel:.4} against the CPU");
        assert!(got.iter().all(|x| x.is_finite()), "{attention:?}: non-finite output");
        assert!(cos >= 0.999, "{attention:?}: cosine {cos} against the CPU");
        assert!(
            got == run(composed.clone(), attention),
            "{attention:?}: the fused forward differs from the composed one"
        );
    }
}

fn sage_v3_matches_v2(be: Arc<dyn Backend>) {
    // Sage v3 (wgmma, sm_90a) against v2 (mma.sync) on the same device: both take the same codes
    // and scales, compute exact integer scores and round P to e4m3 against the same running maxima
    // (64-key tiles in both), so they differ only in the f32 summation order of P·V: at most one
    // bf16 rounding apart. A wrong fragment, swizzle or stage would move outputs by far more.
    // Ragged lengths (one key tile partly past the keys, query blocks partly past the queries),
    // GQA, two batches, more key tiles than stages; and through attention_sage_normed.
    use flux2::backend::AttnMask;
    let cuda = flux2::device::as_cuda(&be).unwrap();
    if !cuda.has_gemm_v3() {
        println!("no Sage v3 on this device (not an sm_90a image)");
        return;
    }
    let act = be.activation_dtype();
    let d = 128;
    for (b, n, h, hkv) in [(2usize, 330usize, 4usize, 2usize), (1, 64, 2, 2), (1, 200, 3, 1)] {
        let draw = |name: &str, heads: usize| {
            let v = flux2::rng::normal_vec(41, name, b * n * heads * d);
            be.upload(&common::t(&v, &[b, n, heads, d]), act).unwrap()
        };
        let (q, k, v) = (draw("q", h), draw("k", hkv), draw("v", hkv));
        let run = || be.attention_sage(&q, &k, &v, &AttnMask::None, 0.088).unwrap().to_vec_f32().unwrap();
        let v3 = run();
        cuda.set_sage_v2(true);
        let v2 = run();
        cuda.set_sage_v2(false);
        assert!(v3.iter().all(|x| x.is_finite()), "B{b} N{n}: non-finite output");
        let (mut worst, mut differ) = (0f32, 0usize);
        for (a, r) in v3.iter().zip(&v2) {
            // One bf16 rounding: 2^-8 of the magnitude (plus a floor for values near zero).
            let err = (a - r).abs() / (a.abs().max(r.abs()) * (1.0 / 256.0) + 1e-6);
            worst = worst.max(err);
            differ += (a != r) as usize;
        }
        println!("B{b} N{n} H{h}/{hkv}: {differ} of {} outputs differ, worst {worst:.2} bf16 roundings", v3.len());
        assert!(worst <= 1.0, "B{b} N{n} H{h}/{hkv}: v3 and v2 differ by {worst} bf16 roundings");
    }
}

fn stream_k_matches_whole_tiles(be: Arc<dyn Backend>) {
    // The v3 GEMMs (sm_90a) with the persistent grid planned for 7 SMs, so shapes a few MB in size
    // split their K slices over blocks the way klein's M = 512 linears do on 132 SMs: each block's
    // range is the tail of one tile, a whole tile and the head of a third. Checked for the bf16,
    // gated-residual and FP8 kernels: stream-K against whole tiles on 7 SMs (several per block)
    // and against the CPU, and stream-K's bits the same on every run (pieces summed in block order).
    let cuda = flux2::device::as_cuda(&be).unwrap();
    if !cuda.has_gemm_v3() {
        println!("no v3 GEMMs on this device (not an sm_90a image): nothing to split");
        return;
    }
    let gemm_env = std::env::var("FLUX2_CUDA_GEMM").unwrap_or_default();
    if !matches!(gemm_env.as_str(), "" | "v3") {
        println!("FLUX2_CUDA_GEMM={gemm_env}: stream-K is off");
        return;
    }
    let cpu: Arc<dyn Backend> = Arc::new(flux2::backend::cpu::CpuBackend::new());
    let (m, n, k) = (300, 640, 512);
    let draw = |name: &str, shape: &[usize], scale: f32| {
        let v: Vec<f32> = flux2::rng::normal_vec(31, name, shape.iter().product()).iter().map(|x| x * scale).collect();
        common::t(&v, shape)
    };
    let (x, w, bias) = (draw("x", &[m, k], 1.0), draw("w", &[n, k], 1.0 / (k as f32).sqrt()), draw("b", &[n], 1.0));
    let (res, gate) = (draw("res", &[2, m / 2, n], 1.0), draw("gate", &[2, n], 1.0));
    let wq = flux2::quant::quantize(&w.to_vec_f32().unwrap(), n, k, flux2::quant::QuantFormat::Fp8).unwrap();
    type Op = fn(&dyn Backend, &[flux2::Tensor], &flux2::quant::Quantized) -> flux2::Tensor;
    let ops: [(&str, usize, Op); 3] = [
        ("linear", k * 2, |be, t, _| be.linear(&t[0], &t[1], Some(&t[2])).unwrap()),
        ("linear_gated_add", k * 2, |be, t, _| {
            let x = t[0].reshape(&[2, t[0].dim(0) / 2, t[0].dim(1)]).unwrap();
            be.linear_gated_add(&t[3], &t[4], &x, &t[1], Some(&t[2])).unwrap()
        }),
        ("linear_fp8", k, |be, t, q| be.linear_fp8(&t[0], &be.load_quantized(q).unwrap(), Some(&t[2])).unwrap()),
    ];
    let act = be.activation_dtype();
    let inputs =
        |b: &Arc<dyn Backend>, dtype| [&x, &w, &bias, &res, &gate].map(|t| b.upload(t, dtype).unwrap()).to_vec();
    let (dev_in, cpu_in) = (inputs(&be, act), inputs(&cpu, flux2::DType::F32));
    cuda.limit_persistent_sms(Some(7));
    for (name, k_bytes, op) in ops {
        let blocks = cuda.gemm_stream_k_blocks(m, n, k_bytes);
        assert_eq!(blocks, Some(7), "{name}: 15 tiles of 8 slices on 7 SMs should split");
        let run = || op(&*be, &dev_in, &wq).to_vec_f32().unwrap();
        let (split, again) = (run(), run());
        cuda.set_gemm_whole_tiles(true);
        let whole = run();
        cuda.set_gemm_whole_tiles(false);
        let reference = op(&*cpu, &cpu_in, &wq).to_vec_f32().unwrap();
        assert!(split.iter().all(|v| v.is_finite()), "{name}: non-finite output");
        assert_eq!(split, again, "{name}: stream-K's bits differ between runs");
        for (what, out) in [("stream-K", &split), ("whole tiles", &whole)] {
            let (cos, rel) = cosine_and_rel_l2(out, &reference);
            println!("{name} {what} on 7 SMs: cosine {cos:.6}, rel_l2 {rel:.2e} against the CPU");
            assert!(cos >= 0.9999 && rel <= 0.01, "{name} {what}: cosine {cos}, rel_l2 {rel}");
        }
        let worst = split.iter().zip(&whole).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
        assert!(worst <= 1.0 / 64.0, "{name}: stream-K and whole tiles differ by {worst} (relative)");
    }
    cuda.limit_persistent_sms(None);
}

fn wide_tiles_match_narrow_ones(be: Arc<dyn Backend>) {
    // The wide v3 GEMMs (128x256 tiles, sm_90a) against the narrow ones on whole tiles, for the
    // bf16, gated-residual and FP8 kernels: the same K slices summed in the same order into each
    // output, so at most one bf16 rounding apart (on the emulator the same bits), and both near
    // the CPU. 300 x 640 outputs: 3 row tiles by 3 wide ones, the last 128 columns wide.
    let cuda = flux2::device::as_cuda(&be).unwrap();
    if !cuda.has_gemm_v3() {
        println!("no v3 GEMMs on this device (not an sm_90a image): no wide tiles");
        return;
    }
    let cpu: Arc<dyn Backend> = Arc::new(flux2::backend::cpu::CpuBackend::new());
    let (m, n, k) = (300, 640, 512);
    let draw = |name: &str, shape: &[usize], scale: f32| {
        let v: Vec<f32> = flux2::rng::normal_vec(37, name, shape.iter().product()).iter().map(|x| x * scale).collect();
        common::t(&v, shape)
    };
    let (x, w, bias) = (draw("x", &[m, k], 1.0), draw("w", &[n, k], 1.0 / (k as f32).sqrt()), draw("b", &[n], 1.0));
    let (res, gate) = (draw("res", &[2, m / 2, n], 1.0), draw("gate", &[2, n], 1.0));
    let wq = flux2::quant::quantize(&w.to_vec_f32().unwrap(), n, k, flux2::quant::QuantFormat::Fp8).unwrap();
    type Op = fn(&dyn Backend, &[flux2::Tensor], &flux2::quant::Quantized) -> flux2::Tensor;
    let ops: [(&str, Op); 3] = [
        ("linear", |be, t, _| be.linear(&t[0], &t[1], Some(&t[2])).unwrap()),
        ("linear_gated_add", |be, t, _| {
            let x = t[0].reshape(&[2, t[0].dim(0) / 2, t[0].dim(1)]).unwrap();
            be.linear_gated_add(&t[3], &t[4], &x, &t[1], Some(&t[2])).unwrap()
        }),
        ("linear_fp8", |be, t, q| be.linear_fp8(&t[0], &be.load_quantized(q).unwrap(), Some(&t[2])).unwrap()),
    ];
    let act = be.activation_dtype();
    let inputs =
        |b: &Arc<dyn Backend>, dtype| [&x, &w, &bias, &res, &gate].map(|t| b.upload(t, dtype).unwrap()).to_vec();
    let (dev_in, cpu_in) = (inputs(&be, act), inputs(&cpu, flux2::DType::F32));
    for (name, op) in ops {
        let run = || op(&*be, &dev_in, &wq).to_vec_f32().unwrap();
        cuda.set_gemm_wide_tiles(true);
        let wide = run();
        cuda.set_gemm_wide_tiles(false);
        cuda.set_gemm_whole_tiles(true);
        cuda.set_gemm_narrow_tiles(true);
        let narrow = run();
        cuda.set_gemm_narrow_tiles(false);
        cuda.set_gemm_whole_tiles(false);
        let reference = op(&*cpu, &cpu_in, &wq).to_vec_f32().unwrap();
        assert!(wide.iter().all(|v| v.is_finite()), "{name}: non-finite output");
        let (cos, rel) = cosine_and_rel_l2(&wide, &reference);
        println!("{name} wide: cosine {cos:.6}, rel_l2 {rel:.2e} against the CPU");
        assert!(cos >= 0.9999 && rel <= 0.01, "{name} wide: cosine {cos}, rel_l2 {rel}");
        let worst = wide
            .iter()
            .zip(&narrow)
            .map(|(a, b)| (a - b).abs() / (a.abs().max(b.abs()) / 256.0 + 1e-6))
            .fold(0f32, f32::max);
        let differ = wide.iter().zip(&narrow).filter(|(a, b)| a != b).count();
        println!("{name}: {differ} of {} outputs differ between wide and narrow tiles", wide.len());
        assert!(worst <= 1.0, "{name}: wide and narrow tiles differ by {worst} bf16 roundings");
    }
}

fn fused_fp8_gated_residuals_give_the_compositions_bits(be: Arc<dyn Backend>) {
    // linear_fp8_gated_add and swiglu_linear_fp8_gated_add add the residual in the FP8 GEMM's
    // epilogue (gemm_w8a8_mma_gated_e4m3; on sm_90a gemm_wgmma_gated_e4m3, stream-K included) with y
    // rounded to bf16 first, so they give the bits of their compositions on the same device
    // (gated_add after linear_fp8 / swiglu_linear_fp8, which plan the same GEMM split).
    let act = be.activation_dtype();
    let draw = |name: &str, shape: &[usize], scale: f32| {
        let v: Vec<f32> = flux2::rng::normal_vec(41, name, shape.iter().product()).iter().map(|x| x * scale).collect();
        be.upload(&common::t(&v, shape), act).unwrap()
    };
    let bits = |t: flux2::Tensor| t.to_vec_f32().unwrap();
    // (B, L, K, N): one whole tile; stream-K on a 132-SM card (K = 1024, 4 tiles); N = 100 (rows
    // of x not 16-byte aligned).
    for (b, l, k, n) in [(1usize, 128usize, 128usize, 128usize), (2, 70, 1024, 136), (2, 9, 64, 100)] {
        let (x, gate, a) = (draw("x", &[b, l, n], 1.0), draw("gate", &[b, n], 1.0), draw("a", &[b, l, k], 1.0));
        let w = flux2::rng::normal_vec(43, "w", n * k).iter().map(|v| v / (k as f32).sqrt()).collect::<Vec<_>>();
        let q = be.load_quantized(&flux2::quant::quantize(&w, n, k, flux2::quant::QuantFormat::Fp8).unwrap()).unwrap();
        let bias = draw("bias", &[n], 0.1);
        let fused = bits(be.linear_fp8_gated_add(&x, &gate, &a, &q, Some(&bias)).unwrap());
        let composed = bits(be.gated_add(&x, &gate, &be.linear_fp8(&a, &q, Some(&bias)).unwrap()).unwrap());
        assert!(fused.iter().all(|v| v.is_finite()), "[{b}, {l}, {k}] -> {n}");
        assert_eq!(fused, composed, "[{b}, {l}, {k}] -> {n}: the fused residual differs from gated_add");
        // The feed-forward's output projection: swiglu of a [B, L, 2K] projection.
        let h = draw("h", &[b, l, 2 * k], 1.0);
        let fused = bits(be.swiglu_linear_fp8_gated_add(&x, &gate, None, &h, &q).unwrap());
        let composed = bits(be.gated_add(&x, &gate, &be.swiglu_linear_fp8(None, &h, &q, None).unwrap()).unwrap());
        assert_eq!(fused, composed, "swiglu [{b}, {l}, {k}·2] -> {n}: the fused residual differs from gated_add");
    }
}

/// A recorded denoising step (a CUDA graph) replayed on new latents, timesteps and guidance gives
/// the eager forward's bits, and each replay's output stays its own (later replays do not
/// overwrite it).
fn step_graphs_replay_the_eager_bits(be: Arc<dyn Backend>) {
    use flux2::model::transformer::Steps;
    let bits = |t: &flux2::Tensor| t.to_vec_f32().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for case in ["t2i_nonsquare", "guidance_outchannels"] {
        let dir = fixtures().join("transformer").join(case);
        let model = Flux2Transformer::load(be.clone(), &dir).unwrap();
        let inputs = dir.join("inputs.safetensors");
        let act = be.activation_dtype();
        let hidden = load(&inputs, "hidden_states");
        let context = be.upload(&load(&inputs, "encoder_hidden_states"), act).unwrap();
        let (img_ids, txt_ids) = (common::position_ids(&inputs, "img_ids"), common::position_ids(&inputs, "txt_ids"));
        let batch = hidden.dim(0);
        // Three steps: their own latents, timesteps (one per sample) and guidance.
        let latents = |k: usize| {
            let v: Vec<f32> = hidden.to_vec_f32().unwrap().iter().map(|x| x * (1.0 - 0.3 * k as f32) + 0.01).collect();
            be.upload(&flux2::Tensor::from_f32(v, hidden.shape()).unwrap(), act).unwrap()
        };
        let times = |k: usize| (0..batch).map(|b| 1000.0 - 300.0 * k as f32 - b as f32).collect::<Vec<f32>>();
        let guided = model.config().guidance_embeds;
        let guidance = |k: usize| guided.then(|| vec![3500.0 + 500.0 * k as f32; batch]);
        let eager: Vec<_> = (0..3)
            .map(|k| {
                model.forward(&latents(k), &context, &times(k), &img_ids, &txt_ids, guidance(k).as_deref()).unwrap()
            })
            .collect();
        let mut steps = Steps::new(&model, &context, &img_ids, &txt_ids, None, true);
        let replayed: Vec<_> =
            (0..3).map(|k| steps.forward(&latents(k), &times(k), guidance(k).as_deref()).unwrap()).collect();
        assert!(steps.replaying(), "{case}: the step was not recorded");
        for (k, (r, e)) in replayed.iter().zip(&eager).enumerate() {
            assert!(bits(r) == bits(e), "{case}: step {k} differs from the eager forward");
        }
        println!("{case}: steps 2 and 3 replayed with the eager forward's bits");
    }
}

/// A recording that leaves memory allocated after it, or uploads inside it, fails with an error
/// (the memory stays usable), and the device goes on working.
fn graph_captures_refuse_escapes_and_uploads(be: Arc<dyn Backend>) {
    let act = be.activation_dtype();
    let x =
        be.upload(&flux2::Tensor::from_f32((0..64).map(|i| i as f32 / 8.0).collect(), &[64]).unwrap(), act).unwrap();
    let want = be.silu(&be.silu(&x).unwrap()).unwrap().to_vec_f32().unwrap();
    let mut kept = None;
    let escaped = be.capture(&[&x], (&[64], act), &mut |bufs| {
        let y = be.silu(&bufs[0])?;
        kept = Some(be.silu(&y)?);
        Ok(y)
    });
    match escaped {
        Err(e) => assert!(e.to_string().contains("outlive"), "{e}"),
        Ok(_) => panic!("a recording that keeps a tensor was accepted"),
    }
    assert_eq!(kept.take().unwrap().to_vec_f32().unwrap(), want, "the escaped tensor after the single launch");
    let host = flux2::Tensor::from_f32(vec![1.0; 64], &[64]).unwrap();
    let uploading = be.capture(&[&x], (&[64], act), &mut |bufs| be.axpby(1.0, &bufs[0], 1.0, &be.upload(&host, act)?));
    assert!(uploading.is_err(), "a recording with an upload inside was accepted");
    assert_eq!(be.silu(&be.silu(&x).unwrap()).unwrap().to_vec_f32().unwrap(), want);
    // And a clean recording replays with new inputs.
    let graph = be.capture(&[&x], (&[64], act), &mut |bufs| be.silu(&bufs[0])).unwrap().expect("CUDA records");
    let x2 = be.axpby(2.0, &x, 0.0, &x).unwrap();
    let got = graph.replay(&[&x2]).unwrap().to_vec_f32().unwrap();
    assert_eq!(got, be.silu(&x2).unwrap().to_vec_f32().unwrap());
    assert!(
        graph.replay(&[&be.upload(&host.reshape(&[8, 8]).unwrap(), act).unwrap()]).is_err(),
        "a replay on another shape"
    );
}

/// The pipeline's image is the same bits with its steps replayed from a graph and run eagerly:
/// text-to-image (plain steps) and the KV scheme (its cached steps recorded).
fn pipeline_images_same_with_and_without_graphs(be: Arc<dyn Backend>) {
    let cuda = flux2::device::as_cuda(&be).unwrap();
    let pipe = Pipeline::load(be.clone(), &fixtures().join("pipeline")).unwrap();
    let t2i = flux2::pipeline::Request {
        prompt: "a red fox in snow".into(),
        width: Some(64),
        height: Some(48),
        steps: Some(4),
        ..Default::default()
    };
    let kv = common::workflows::cases("kv").into_iter().next().expect("a KV workflow case");
    let kv_request = flux2::pipeline::Request { kv_cache: true, steps: Some(4), ..kv.request() };
    let references = pipe.prepare_references(&kv.references()).unwrap();
    // 4 steps: text-to-image replays steps 2-4 (recorded at 2), the KV scheme steps 3-4 (its
    // first cached step, 2, runs eagerly).
    let cases = [("text-to-image", &t2i, None, 3), ("KV scheme", &kv_request, references.as_ref(), 2)];
    for (name, request, refs, replays) in cases {
        let replayed = pipe.generate(request, None, refs).unwrap();
        assert_eq!(replayed.timings.replayed_steps, replays, "{name}: steps replayed from the graph");
        cuda.set_graphs(false);
        let eager = pipe.generate(request, None, refs);
        cuda.set_graphs(true);
        let eager = eager.unwrap();
        assert_eq!(eager.timings.replayed_steps, 0, "{name}: with graphs off");
        let (a, b) = (replayed.latents.to_vec_f32().unwrap(), eager.latents.to_vec_f32().unwrap());
        assert!(a == b, "{name}: final latents differ");
        assert!(replayed.image.data == eager.image.data, "{name}: images differ");
        println!("{name}: the same bits with and without graphs");
    }
}

fn gpu_expected() -> bool {
    std::env::var("FLUX2_EXPECT_GPU").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let expect_gpu = gpu_expected();
    let gpu = flux2::device::select(flux2::device::DeviceChoice::Cuda);
    let device_error = match &gpu {
        Ok(be) => {
            let emulated = flux2::device::as_cuda(be).is_some_and(|c| c.is_emulated());
            eprintln!(
                "CUDA device: {}{}",
                be.name(),
                if emulated { " (emulated: kernels run on the CPU)" } else { "" }
            );
            None
        }
        Err(e) if expect_gpu => {
            eprintln!("error: FLUX2_EXPECT_GPU=1 but the CUDA device did not initialise: {e}");
            eprintln!("the GPU checks below fail");
            Some(e.to_string())
        }
        Err(e) => {
            eprintln!("no CUDA device ({e}): the GPU checks below are ignored");
            Some(e.to_string())
        }
    };
    let gpu = gpu.ok();
    type Check = fn(Arc<dyn Backend>);
    let checks: [(&str, Check, bool); 21] = [
        ("every_op_matches_the_cpu_reference", every_op_matches_the_cpu_reference, true),
        ("transformer_fixtures_in_bf16", transformer_fixtures_in_bf16, true),
        ("checkpoint_formats_in_bf16", checkpoint_formats_in_bf16, true),
        ("loras_in_bf16", loras_in_bf16, true),
        ("pipeline_images_within_2_of_255", pipeline_images_within_2_of_255, true),
        ("components_in_bf16", components_in_bf16, true),
        ("workflows_within_2_of_255", workflows_within_2_of_255, true),
        ("quantized_linears_reject_bad_shapes", quantized_linears_reject_bad_shapes, false),
        ("sage_quantize_v2_gives_v1s_bits", sage_quantize_v2_gives_v1s_bits, true),
        ("sage_normed_gives_the_compositions_bits", sage_normed_gives_the_compositions_bits, true),
        ("attention_fp8_out_gives_the_compositions_bits", attention_fp8_out_gives_the_compositions_bits, true),
        (
            "fp8_double_blocks_at_head_dim_128_stay_close_to_the_cpu",
            fp8_double_blocks_at_head_dim_128_stay_close_to_the_cpu,
            true,
        ),
        ("sage_v3_matches_v2", sage_v3_matches_v2, true),
        ("stream_k_matches_whole_tiles", stream_k_matches_whole_tiles, true),
        ("wide_tiles_match_narrow_ones", wide_tiles_match_narrow_ones, true),
        (
            "fused_fp8_gated_residuals_give_the_compositions_bits",
            fused_fp8_gated_residuals_give_the_compositions_bits,
            true,
        ),
        ("step_graphs_replay_the_eager_bits", step_graphs_replay_the_eager_bits, true),
        ("graph_captures_refuse_escapes_and_uploads", graph_captures_refuse_escapes_and_uploads, true),
        ("pipeline_images_same_with_and_without_graphs", pipeline_images_same_with_and_without_graphs, true),
        ("an_overflow_stops_the_pipeline_with_the_step", an_overflow_stops_the_pipeline_with_the_step, true),
        ("no_gpu_gives_a_clear_error_or_a_working_device", no_gpu_gives_a_clear_error_or_a_working_device, false),
    ];
    let trials = checks
        .into_iter()
        .map(|(name, check, needs_gpu)| {
            if needs_gpu && gpu.is_none() && expect_gpu {
                let msg =
                    format!("FLUX2_EXPECT_GPU=1 but no CUDA device: {}", device_error.clone().unwrap_or_default());
                return libtest_mimic::Trial::test(name, move || Err(msg.into()));
            }
            let be = gpu.clone().unwrap_or_else(|| Arc::new(flux2::backend::cpu::CpuBackend::new()));
            libtest_mimic::Trial::test(name, move || {
                check(be);
                Ok(())
            })
            .with_ignored_flag(needs_gpu && gpu.is_none())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
