//! The memory planner on the real klein-4B/9B shapes (no GPU).

mod common;

use flux2::planner::{self, parse_bytes, EncoderPrecision, PlanInput, TransformerPrecision, TransformerResidency};
use flux2::synth::PipelineSpec;

const GIB: usize = 1 << 30;

fn input(spec: PipelineSpec, tp: TransformerPrecision, ep: EncoderPrecision, side: usize, budget: usize) -> PlanInput {
    PlanInput {
        transformer: spec.transformer,
        text_encoder: spec.text_encoder,
        vae: spec.vae,
        transformer_precision: tp,
        encoder_precision: ep,
        width: side,
        height: side,
        references: vec![],
        cfg: false,
        batch: 1,
        kv_cache: false,
        budget,
        stored_blocks: Default::default(),
        stored_fp8: Default::default(),
    }
}

#[test]
fn klein_9b_int4_encoder_fp8_transformer_fits_16_gib_at_1024() {
    let p = planner::plan(&input(
        PipelineSpec::klein_9b(),
        TransformerPrecision::Fp8,
        EncoderPrecision::Int4,
        1024,
        16 * GIB,
    ))
    .unwrap();
    assert!(p.peak <= 16 * GIB);
    assert!(!matches!(p.transformer, TransformerResidency::StreamBlocks { .. }), "{}", p.describe());
    // Real sizes: the fp8 9B transformer is about 9 GB (9.08 B parameters, 8.7 B in block linears).
    assert!((8 * GIB..10 * GIB).contains(&p.weights.transformer), "{}", p.weights.transformer);
}

#[test]
fn klein_4b_fits_8_gib() {
    for (tp, ep) in [
        (TransformerPrecision::Fp8, EncoderPrecision::Int4),
        (TransformerPrecision::Fp8, EncoderPrecision::Int8),
        (TransformerPrecision::Bf16, EncoderPrecision::Int4),
    ] {
        let p = planner::plan(&input(PipelineSpec::klein_4b(), tp, ep, 1024, 8 * GIB)).unwrap();
        assert!(p.peak <= 8 * GIB, "{tp:?}/{ep:?}: {}", p.describe());
        assert!(p.evict_encoder_after_encode, "8 GiB cannot hold both models: {}", p.describe());
    }
}

#[test]
fn decisions_follow_the_budget() {
    let spec = PipelineSpec::klein_4b;
    let bf = TransformerPrecision::Bf16;
    let roomy = planner::plan(&input(spec(), bf, EncoderPrecision::Bf16, 1024, 80 * GIB)).unwrap();
    assert_eq!(roomy.transformer, TransformerResidency::Resident);
    assert!(!roomy.evict_encoder_after_encode && !roomy.evict_transformer_before_decode && roomy.decode_tile.is_none());
    let mid = planner::plan(&input(spec(), bf, EncoderPrecision::Bf16, 1024, 14 * GIB)).unwrap();
    assert!(mid.evict_encoder_after_encode);
    assert!(matches!(mid.transformer, TransformerResidency::LoadAfterEncode | TransformerResidency::LoadDuringEncode));
    let tight = planner::plan(&input(spec(), bf, EncoderPrecision::Int4, 1024, 6 * GIB)).unwrap();
    assert!(
        matches!(tight.transformer, TransformerResidency::StreamBlocks { resident_blocks } if resident_blocks >= 2),
        "{}",
        tight.describe()
    );
    assert!(tight.evict_transformer_before_decode);
    // A large image on a small budget decodes in tiles.
    let big = planner::plan(&input(spec(), TransformerPrecision::Fp8, EncoderPrecision::Int4, 2048, 4 * GIB)).unwrap();
    assert!(big.decode_tile.is_some(), "{}", big.describe());
    for p in [&roomy, &mid, &tight, &big] {
        assert!(p.peak <= p.budget);
        assert_eq!(p.peak, p.phases.iter().map(|ph| ph.peak).max().unwrap());
    }
}

#[test]
fn impossible_budget_names_the_smallest_that_works() {
    let inp = input(PipelineSpec::klein_9b(), TransformerPrecision::Fp8, EncoderPrecision::Int4, 1024, 2 * GIB);
    let e = planner::plan(&inp).unwrap_err().to_string();
    let needed = e.split("smallest budget that works is ").nth(1).and_then(|r| r.split(" GiB").next()).unwrap();
    let needed = parse_bytes(&format!("{needed}GiB")).unwrap();
    assert!(needed > 2 * GIB);
    // That budget works, and noticeably less does not.
    assert!(planner::plan(&PlanInput { budget: needed + (16 << 20), ..inp.clone() }).is_ok());
    assert!(planner::plan(&PlanInput { budget: needed - (256 << 20), ..inp }).is_err());
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_bytes("16GiB").unwrap(), 16 * GIB);
    assert_eq!(parse_bytes("16 GB").unwrap(), 16_000_000_000);
    assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_bytes("8g").unwrap(), 8 * GIB);
    assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 * GIB / 2);
    assert!(parse_bytes("lots").is_err());
    assert!(parse_bytes("3 parsecs").is_err());
}

#[test]
fn plan_cli_prints_json() {
    let (ok, out, err) = common::run_cli(&[
        "plan",
        "--config",
        "klein-9b",
        "--vram-budget",
        "16GiB",
        "--precision",
        "fp8",
        "--text-encoder-precision",
        "int4",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["peak"].as_u64().unwrap() <= 16 * GIB as u64);
    let (ok, _, err) = common::run_cli(&["plan", "--config", "klein-9b", "--vram-budget", "1GiB"]);
    assert!(!ok && err.contains("smallest budget"), "{err}");
    let (ok, out, _) = common::run_cli(&[
        "plan",
        "--config",
        common::fixtures().join("pipeline").to_str().unwrap(),
        "--vram-budget",
        "1GiB",
        "--width",
        "64",
        "--height",
        "64",
    ]);
    assert!(ok && out.contains("predicted peak"));
}

#[test]
fn plan_cli_plans_references_at_their_encoded_size() {
    // A 4000x3000 reference is encoded area-capped to 1182x886, then cropped to 1168x880.
    let peak = |r: &str| {
        let (ok, out, err) =
            common::run_cli(&["plan", "--config", "klein-4b", "--vram-budget", "80GiB", "--ref", r, "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["peak"].as_u64().unwrap()
    };
    assert_eq!(peak("4000x3000"), peak("1168x880"));
    assert!(peak("1168x880") > peak("512x512"));
}

#[test]
fn block_streaming_counts_the_block_in_flight() {
    let tight = planner::plan(&input(
        PipelineSpec::klein_4b(),
        TransformerPrecision::Bf16,
        EncoderPrecision::Int4,
        1024,
        6 * GIB,
    ))
    .unwrap();
    let TransformerResidency::StreamBlocks { resident_blocks } = tight.transformer else {
        panic!("expected block streaming: {}", tight.describe())
    };
    let w = tight.weights;
    let denoise = tight.phases.iter().find(|p| p.name == "denoise").unwrap();
    let held = denoise.resident.iter().find(|(n, _)| n == "transformer").unwrap().1;
    assert_eq!(held, w.transformer_non_block + (resident_blocks + 1) * w.transformer_block);
    // A transformer of a single block plans (streamed or not) without a panic.
    let mut spec = PipelineSpec::klein_4b();
    (spec.transformer.num_layers, spec.transformer.num_single_layers) = (1, 0);
    for budget in [GIB, 2 * GIB, 4 * GIB] {
        let _ = planner::plan(&input(spec.clone(), TransformerPrecision::Bf16, EncoderPrecision::Int4, 1024, budget));
    }
}

#[test]
fn a_batch_needs_more_denoise_memory() {
    let one = input(PipelineSpec::klein_4b(), TransformerPrecision::Bf16, EncoderPrecision::Bf16, 1024, 80 * GIB);
    let four = PlanInput { batch: 4, ..one.clone() };
    let denoise = |i: &PlanInput| {
        let p = planner::plan(i).unwrap();
        p.phases.iter().find(|p| p.name == "denoise").unwrap().peak
    };
    let (d1, d4) = (denoise(&one), denoise(&four));
    assert!(d4 > d1, "batch 4 denoise peak {d4} <= batch 1 {d1}");
    // Activations scale with the rows; the weights do not.
    let act =
        |i: &PlanInput| planner::plan(i).unwrap().phases.iter().find(|p| p.name == "denoise").unwrap().activations;
    assert_eq!(act(&four), 4 * act(&one));
}

#[test]
fn the_kv_cache_is_planned() {
    let mut inp = input(PipelineSpec::klein_9b(), TransformerPrecision::Bf16, EncoderPrecision::Bf16, 1024, 80 * GIB);
    inp.references = vec![(1024, 1024)];
    let without = planner::plan(&inp).unwrap();
    let with = planner::plan(&PlanInput { kv_cache: true, ..inp.clone() }).unwrap();
    // 9B: 8 double + 24 single blocks, hidden 4096; K and V of 4096 reference tokens in bf16.
    let expected = 32 * 2 * 4096 * 4096 * 2;
    assert_eq!(with.weights.kv_cache, expected);
    assert_eq!(without.weights.kv_cache, 0);
    let denoise = |p: &planner::Plan| p.phases.iter().find(|p| p.name == "denoise").unwrap().peak;
    assert_eq!(denoise(&with), denoise(&without) + expected);
    let (ok, stdout, err) = common::run_cli(&[
        "plan",
        "--config",
        "klein-9b",
        "--vram-budget",
        "80GiB",
        "--ref",
        "1024x1024",
        "--kv-cache",
        "--json",
    ]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["weights"]["kv_cache"], expected);
}

/// The CPU plan counts what the CPU backend stores: f32 activations always, weights as stored
/// (bf16, fp8, quantized codes) in bf16 precision and widened to f32 in f32 precision.
#[test]
fn cpu_plans_use_the_cpu_backends_sizes() {
    use flux2::backend::cpu::CpuPrecision;
    use flux2::planner::Target;
    let (bf16, f32) = (Target::Cpu(CpuPrecision::Bf16), Target::Cpu(CpuPrecision::F32));
    let inp = input(PipelineSpec::klein_4b(), TransformerPrecision::Bf16, EncoderPrecision::Bf16, 512, 64 * GIB);
    let gpu = planner::plan(&inp).unwrap();
    let cpu16 = planner::plan_for(&inp, bf16).unwrap();
    let cpu32 = planner::plan_for(&inp, f32).unwrap();
    assert_eq!(cpu16.weights.transformer, gpu.weights.transformer);
    assert_eq!(cpu32.weights.transformer, 2 * gpu.weights.transformer);
    assert_eq!(cpu32.weights.text_encoder, 2 * gpu.weights.text_encoder);
    let act = |p: &planner::Plan| p.phases.iter().find(|p| p.name == "denoise").unwrap().activations;
    assert_eq!(act(&cpu16), 2 * act(&gpu));

    // A 16 GB machine (about 14.5 GiB available): klein-4B at 512² in bf16 fits; in f32 only by
    // streaming blocks, and with 8 GiB not at all (the error says what would). With 10 GiB the
    // bf16 encoder is evicted before the transformer loads.
    let small = PlanInput { budget: 14 * GIB + GIB / 2, ..inp.clone() };
    assert!(planner::plan_for(&small, bf16).unwrap().peak <= small.budget);
    let tight = PlanInput { budget: 10 * GIB, ..inp.clone() };
    let p = planner::plan_for(&tight, bf16).unwrap();
    assert!(p.evict_encoder_after_encode, "{}", p.describe());
    assert_eq!(p.transformer, TransformerResidency::LoadAfterEncode, "{}", p.describe());
    assert!(p.peak <= tight.budget);
    let widened = planner::plan_for(&small, f32).unwrap();
    assert!(matches!(widened.transformer, TransformerResidency::StreamBlocks { .. }), "{}", widened.describe());
    let err = planner::plan_for(&PlanInput { budget: 8 * GIB, ..inp.clone() }, f32).unwrap_err().to_string();
    assert!(err.contains("smallest budget") && err.contains("--cpu-precision bf16"), "{err}");
    // bf16 precision keeps quantized codes as the GPU does (the GEMM dequantizes in its
    // packing): int4/int8 encoders and an fp8 transformer cost what they cost on the GPU, less
    // than bf16; f32 precision dequantizes them at load.
    for encoder_precision in [EncoderPrecision::Int8, EncoderPrecision::Int4, EncoderPrecision::Fp8] {
        let q = PlanInput { encoder_precision, ..inp.clone() };
        let (on_gpu, on_cpu) = (planner::plan(&q).unwrap(), planner::plan_for(&q, bf16).unwrap());
        assert_eq!(on_cpu.weights.text_encoder, on_gpu.weights.text_encoder, "{encoder_precision:?}");
        assert!(on_cpu.weights.text_encoder < cpu16.weights.text_encoder, "{encoder_precision:?}");
        assert_eq!(planner::plan_for(&q, f32).unwrap().weights.text_encoder, cpu32.weights.text_encoder);
    }
    let fp8 = PlanInput { transformer_precision: TransformerPrecision::Fp8, ..inp.clone() };
    assert_eq!(
        planner::plan_for(&fp8, bf16).unwrap().weights.transformer,
        planner::plan(&fp8).unwrap().weights.transformer
    );
    assert!(planner::plan_for(&fp8, bf16).unwrap().weights.transformer < cpu16.weights.transformer);
}
