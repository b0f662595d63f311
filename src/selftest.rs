//! The backend-ops harness (ggml's test-backend-ops pattern): every op on random inputs, on a
//! backend under test against the CPU reference, with dtype-scaled tolerances. Inputs are
//! rounded to bf16 first so both sides see identical values; output buffers are poisoned with
//! NaN on the GPU so an unwritten element fails the check.

use std::time::Instant;

use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnMask, Backend, GatedFp8, Padding2d, QkPart, QkRope, RopePairs};
use crate::dtype::{round_through, DType};
use crate::error::Result;
use crate::quant::{quantize, QuantFormat};
use crate::tensor::Tensor;

/// How an input is drawn and stored.
#[derive(Clone)]
pub enum Input {
    /// Normal(0, scale), stored as the activation dtype.
    Act(Vec<usize>, f32),
    /// Normal(mean, scale), kept f32 (RoPE tables, per-channel affine parameters).
    Table(Vec<usize>, f32, f32),
}

type OpFn = Box<dyn Fn(&dyn Backend, &[Tensor]) -> Result<Tensor> + Send + Sync>;

pub struct Case {
    pub op: &'static str,
    pub shape: String,
    pub inputs: Vec<Input>,
    /// Tolerance on ‖out − ref‖ / ‖ref‖, in units of the activation dtype's rounding (2⁻⁸ for bf16).
    pub ulps: f32,
    pub run: OpFn,
    /// False when a run includes host work besides the op (quantizing the weight): its time would
    /// not be the kernel's, so none is reported (`flux2 bench gemm` times those kernels).
    pub timed: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub op: String,
    pub shape: String,
    pub rel_l2: f64,
    pub max_abs: f64,
    pub tolerance: f64,
    pub nan: usize,
    pub passed: bool,
    pub micros: f64,
    pub error: Option<String>,
    /// The backend's output and its shape, when the run was asked to keep it (`--dump`: the
    /// emulator-versus-hardware comparison).
    #[serde(skip)]
    pub output: Option<(Vec<f32>, Vec<usize>)>,
}

fn act(shape: &[usize]) -> Input {
    Input::Act(shape.to_vec(), 1.0)
}

fn case(op: &'static str, shape: impl Into<String>, inputs: Vec<Input>, ulps: f32, run: OpFn) -> Case {
    Case { op, shape: shape.into(), inputs, ulps, run, timed: true }
}

impl Case {
    fn untimed(self) -> Case {
        Case { timed: false, ..self }
    }
}

/// Which shapes a suite uses. Both run every op through every kernel and launch path with the same
/// tolerances; they differ in sizes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    /// Odd sizes (tail paths) and the real klein shapes: for a GPU.
    Full,
    /// The same paths at small sizes (rows and columns mostly under 256, K under 512, attention
    /// over at most 130 keys): for the CUDA emulator (cuda-sim/), which runs the kernels on the
    /// CPU about 1000x slower than a GPU.
    Small,
}

impl Suite {
    /// Small when `be` is the CUDA backend on the emulated driver, else Full.
    pub fn for_backend(be: &dyn Backend) -> Suite {
        if is_emulated(be) {
            Suite::Small
        } else {
            Suite::Full
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Suite::Full => "full",
            Suite::Small => "small",
        }
    }
}

/// True when `be` is the CUDA backend (on a GPU or the emulator).
pub fn is_cuda(be: &dyn Backend) -> bool {
    #[cfg(feature = "cuda")]
    {
        be.as_any().downcast_ref::<crate::backend::cuda::CudaBackend>().is_some()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = be;
        false
    }
}

/// True when `be` is the CUDA backend running on flux2's CUDA emulator (kernels on the CPU).
pub fn is_emulated(be: &dyn Backend) -> bool {
    #[cfg(feature = "cuda")]
    {
        be.as_any().downcast_ref::<crate::backend::cuda::CudaBackend>().is_some_and(|c| c.is_emulated())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = be;
        false
    }
}

/// The cases of `suite`. Full: odd sizes (tail paths), the real klein shapes (reduced in rows
/// where the CPU reference would be slow), and every op the models use. Small: the same ops and
/// tolerances at sizes the emulator runs in minutes, still reaching every kernel and launch path
/// (the comments name the path each small case is there for), plus a few paths the full suite
/// reaches only through its large shapes or not at all.
pub fn cases(suite: Suite) -> Vec<Case> {
    let small = suite == Suite::Small;
    let mut v = Vec::new();
    // (rows, inner, outputs, bias, element offset of the input: 1 puts its rows 2 bytes off the
    // 16-byte alignment gemm_mma_bf16 needs)
    let linears: &[(usize, usize, usize, bool, usize)] = match suite {
        Suite::Full => &[
            (7, 13, 5, false, 0),
            (37, 64, 96, true, 0),
            (130, 72, 200, false, 0),
            (45, 64, 90, true, 0),
            (256, 3072, 9216, false, 0),
            (256, 3072, 27648, false, 0),
            (128, 9216, 3072, false, 0),
            (64, 12288, 3072, false, 0),
            (300, 2560, 4096, true, 0),
        ],
        Suite::Small => &[
            (7, 13, 5, false, 0),       // gemm_tiled: K % 8 != 0, one ragged tile
            (40, 50, 33, true, 0),      // gemm_tiled: 3x3 ragged tiles, K tail, column bias
            (24, 64, 40, false, 1),     // gemm_tiled: K % 8 == 0 but the input is misaligned
            (37, 64, 96, true, 0),      // gemm_mma: one ragged block, column bias
            (130, 72, 200, false, 0),   // gemm_mma: 2x2 ragged blocks, K tail of 8 (3 K tiles)
            (140, 264, 72, true, 0),    // gemm_mma: 9 K tiles through the 2-stage pipeline, bias
            (45, 64, 90, true, 0),      // gemm_mma: N % 8 = 2, the epilogue's last store of a row partial
            (130, 960, 136, true, 0),   // gemm_wgmma (sm_90a): stream-K, 4 tiles of 15 K slices over 15 blocks
            (1170, 72, 1792, false, 0), // gemm_wgmma: 70 wide tiles on an H100's 132 SMs (1 wave, not 2 narrow)
        ],
    };
    // On sm_90a images the cases above with K % 8 == 0 run v3 (gemm_wgmma); these run v2 there
    // too, v3 on whole tiles where it would split K, and v3 on 128x256 tiles (gemm_wgmma_bf16_wide;
    // elsewhere they repeat the default path).
    let other_linears = [
        ((130, 72, 200, false, 0), GemmKernels::V2),
        ((140, 264, 72, true, 0), GemmKernels::V2),
        ((130, 960, 136, true, 0), GemmKernels::WholeTiles), // 15 K slices round the 5-stage ring 3 times
        ((130, 384, 300, true, 0), GemmKernels::Wide),       // 2x2 wide tiles, ragged; 6 slices round 3 stages
        ((1170, 72, 1792, false, 0), GemmKernels::Narrow),   // 140 narrow tiles on 132 SMs: some blocks walk two
    ];
    let linears = linears.iter().map(|&c| (c, GemmKernels::Cur)).chain(other_linears);
    for ((m, k, n, bias, off), gemm) in linears {
        let x = if off == 0 { act(&[m, k]) } else { act(&[off + m * k]) };
        let mut inputs = vec![x, Input::Act(vec![n, k], 1.0 / (k as f32).sqrt())];
        if bias {
            inputs.push(act(&[n]));
        }
        let at = if off == 0 { String::new() } else { format!(" at +{off} elements") };
        v.push(case(
            "linear",
            format!("{m}x{k} · {n}x{k}ᵀ{at}{}", gemm.suffix()),
            inputs,
            3.0,
            Box::new(move |be, t| {
                let run = || {
                    if off == 0 {
                        be.linear(&t[0], &t[1], t.get(2))
                    } else {
                        be.linear(&t[0].narrow(0, off, m * k)?.reshape(&[m, k])?, &t[1], t.get(2))
                    }
                };
                with_gemm_kernels(be, gemm, run)
            }),
        ));
    }
    // Weight-only int8, int4 in groups and fp8 codes; (rows, inner, outputs, bias). K % 16 == 0:
    // gemm_wq_mma (v2: ragged 128-tiles, 10 k tiles, bias); K = 200 (int8 and fp8 only, int4
    // needs whole groups): gemm_wq_tiled (v1).
    let quantized: &[(usize, usize, usize, bool)] = match suite {
        Suite::Full => &[(9, 128, 40, false), (130, 2560, 1024, false), (33, 200, 24, true), (20, 128, 70, true)],
        Suite::Small => &[(9, 128, 40, false), (130, 320, 70, true), (33, 200, 24, true)],
    };
    for (fmt, name) in
        [(QuantFormat::Int8, "int8"), (QuantFormat::Int4 { group: 64 }, "int4 g64"), (QuantFormat::Fp8, "fp8")]
    {
        for &(m, k, n, bias) in quantized {
            if k % fmt.group().max(1) != 0 {
                continue;
            }
            let mut inputs = vec![act(&[m, k]), Input::Act(vec![n, k], 1.0 / (k as f32).sqrt())];
            if bias {
                inputs.push(act(&[n]));
            }
            v.push(
                case(
                    "linear_quantized",
                    format!("{name} {m}x{k} · {n}x{k}ᵀ{}", if bias { " +bias" } else { "" }),
                    inputs,
                    3.0,
                    Box::new(move |be, t| {
                        let q = quantize(&t[1].to_vec_f32()?, n, k, fmt)?;
                        be.linear_quantized(&t[0], &be.load_quantized(&q)?, t.get(2))
                    }),
                )
                .untimed(),
            );
        }
    }
    // GGUF's block types as files store them (ggml_blocks.cuh): random valid blocks, K of two
    // 256-element super-blocks, ragged M and N; gemm_wq_mma (v2), and gemm_wq_tiled (v1) for an
    // input 2 bytes off the 16-byte alignment v2 needs (element offset, the third number).
    let ggml_shapes: &[(usize, usize, usize, usize)] = match suite {
        Suite::Full => &[(9, 512, 40, 0), (130, 2560, 96, 0), (9, 512, 40, 1)],
        Suite::Small => &[(9, 512, 40, 0), (9, 512, 40, 1)],
    };
    for ty in crate::weights::ggml::GgmlType::QUANTIZED {
        for &(m, k, n, off) in ggml_shapes {
            let at = if off == 0 { String::new() } else { format!(" at +{off} elements") };
            v.push(
                case(
                    "linear_quantized",
                    format!("{} {m}x{k} · {n}x{k}ᵀ{at}", ty.name()),
                    vec![act(&[off + m * k])],
                    3.0,
                    Box::new(move |be, t| {
                        let x = t[0].narrow(0, off, m * k)?.reshape(&[m, k])?;
                        let codes = crate::weights::ggml::synthetic_blocks(ty, n * k, (m * 131 + k) as u64);
                        let q = crate::quant::Quantized {
                            format: QuantFormat::Ggml(ty),
                            rows: n,
                            cols: k,
                            codes,
                            scales: vec![],
                        };
                        be.linear_quantized(&x, &be.load_quantized(&q)?, None)
                    }),
                )
                .untimed(),
            );
        }
    }
    // K % 16 == 0 on sm_89+ images: quantize_rows_e4m3 + gemm_w8a8_mma_e4m3 (v2, ragged 128-tiles,
    // several 64-byte k tiles), on sm_90a gemm_wgmma_e4m3 (v3) unless v2 is asked for; otherwise
    // (K = 72, or older images) row_absmax + gemm_w8a8_tiled (v1).
    let fp8: &[(usize, usize, usize, bool, GemmKernels)] = match suite {
        Suite::Full => &[
            (9, 128, 40, false, GemmKernels::Cur),
            (5, 72, 24, true, GemmKernels::Cur),
            (256, 3072, 1024, false, GemmKernels::Cur),
        ],
        Suite::Small => &[
            (9, 128, 40, false, GemmKernels::Cur),
            (5, 72, 24, true, GemmKernels::Cur),
            (70, 320, 136, true, GemmKernels::Cur),
            (130, 208, 150, false, GemmKernels::Cur),
            (130, 208, 150, false, GemmKernels::V2),
            (70, 960, 136, true, GemmKernels::Cur), // v3: stream-K, 2 tiles of 8 K slices (the last half) over 4 blocks
            (70, 960, 136, true, GemmKernels::WholeTiles), // v3: the ring wraps
            (70, 384, 300, true, GemmKernels::Wide), // v3 wide: 2 tiles of 256 columns, the last ragged
        ],
    };
    for &(m, k, n, bias, gemm) in fp8 {
        let mut inputs = vec![act(&[m, k]), Input::Act(vec![n, k], 1.0 / (k as f32).sqrt())];
        if bias {
            inputs.push(act(&[n]));
        }
        v.push(
            case(
                "linear_fp8",
                format!("{m}x{k} · {n}x{k}ᵀ{}{}", if bias { " +bias" } else { "" }, gemm.suffix()),
                inputs,
                4.0,
                Box::new(move |be, t| {
                    let q = quantize(&t[1].to_vec_f32()?, n, k, QuantFormat::Fp8)?;
                    let run = || be.linear_fp8(&t[0], &be.load_quantized(&q)?, t.get(2));
                    with_gemm_kernels(be, gemm, run)
                }),
            )
            .untimed(),
        );
    }
    // layer_norm_modulate_linear_fp8: on sm_89+ images with K % 16 == 0 one kernel normalises,
    // modulates and quantizes (layer_norm_modulate_e4m3) before gemm_w8a8_mma_e4m3; else (K = 72,
    // older images) layer_norm + linear_fp8. Shift and scale are strided chunks of [B, 6K].
    // (B, L, K, N, bias)
    let normed_fp8: &[(usize, usize, usize, usize, bool)] = match suite {
        Suite::Full => &[(1, 300, 3072, 1024, false), (2, 9, 72, 24, true)],
        Suite::Small => &[(2, 70, 320, 136, true), (2, 9, 72, 24, true)],
    };
    for &(b, l, k, n, bias) in normed_fp8 {
        let mut inputs = vec![act(&[b, l, k]), act(&[b, 6 * k]), Input::Act(vec![n, k], 1.0 / (k as f32).sqrt())];
        if bias {
            inputs.push(act(&[n]));
        }
        v.push(
            case(
                "layer_norm_modulate_linear_fp8",
                format!("[{b}, {l}, {k}] · {n}x{k}ᵀ{}", if bias { " +bias" } else { "" }),
                inputs,
                4.0,
                Box::new(move |be, t| {
                    let q = quantize(&t[2].to_vec_f32()?, n, k, QuantFormat::Fp8)?;
                    let (shift, scale) = (t[1].narrow(1, 0, k)?, t[1].narrow(1, k, k)?);
                    be.layer_norm_modulate_linear_fp8(&t[0], &shift, &scale, 1e-6, &be.load_quantized(&q)?, t.get(3))
                }),
            )
            .untimed(),
        );
    }
    // swiglu_linear_fp8: on sm_89+ images with K % 16 == 0 swiglu_concat_e4m3 quantizes
    // [prefix | swiglu(slice of a fused projection)] before gemm_w8a8_mma_e4m3 (with a prefix as
    // the single block's output projection, without as the double block's feed-forward); else
    // (K = 12, older images) swiglu_concat / swiglu + linear_fp8. (B, L, prefix width, M, N, bias)
    let swiglu_fp8: &[(usize, usize, usize, usize, usize, bool)] = match suite {
        Suite::Full => &[(1, 300, 256, 512, 320, false), (2, 9, 0, 64, 24, true), (2, 5, 4, 8, 16, false)],
        Suite::Small => &[(2, 70, 48, 80, 136, true), (2, 9, 0, 64, 24, true), (2, 5, 4, 8, 16, false)],
    };
    for &(b, l, p, m, n, bias) in swiglu_fp8 {
        let k = p + m;
        // The fused projection: 16 leading columns, then gate and value.
        let mut inputs =
            vec![act(&[b, l, p.max(1)]), act(&[b, l, 16 + 2 * m]), Input::Act(vec![n, k], 1.0 / (k as f32).sqrt())];
        if bias {
            inputs.push(act(&[n]));
        }
        v.push(
            case(
                "swiglu_linear_fp8",
                format!("[{b}, {l}, {p}] + swiglu of [{b}, {l}, {m}·2] · {n}x{k}ᵀ{}", if bias { " +bias" } else { "" }),
                inputs,
                4.0,
                Box::new(move |be, t| {
                    let q = quantize(&t[2].to_vec_f32()?, n, k, QuantFormat::Fp8)?;
                    let x = t[1].narrow(2, 16, 2 * m)?;
                    let prefix = (p > 0).then_some(&t[0]);
                    be.swiglu_linear_fp8(prefix, &x, &be.load_quantized(&q)?, t.get(3))
                }),
            )
            .untimed(),
        );
    }
    // The gated residual of an FP8 linear, x + gate · linear_fp8(a, w, bias), the gate a strided
    // chunk of a [B, 6N] modulation tensor: on sm_89+ images with K % 16 == 0 quantize_rows_e4m3 +
    // gemm_w8a8_mma_gated_e4m3 (sm_90a: gemm_wgmma_gated_e4m3, K = 896 split by stream-K; "v2"
    // the mma.sync kernel there); K = 72 (and older images) linear_fp8 + gated_add. N = 100 leaves
    // the rows of x unaligned for 16-byte access. (B, L, K, N, bias, kernels)
    let gated_fp8: &[(usize, usize, usize, usize, bool, GemmKernels)] = match suite {
        Suite::Full => &[
            (1, 300, 3072, 3072, false, GemmKernels::Cur),
            (1, 300, 3072, 3072, false, GemmKernels::Wide),
            (2, 9, 72, 100, true, GemmKernels::Cur),
        ],
        Suite::Small => &[
            (2, 70, 128, 136, true, GemmKernels::Cur),
            (2, 70, 896, 136, false, GemmKernels::Cur),
            (2, 70, 128, 136, true, GemmKernels::V2),
            (2, 70, 256, 300, true, GemmKernels::Wide),
            (2, 9, 64, 100, false, GemmKernels::Cur),
            (2, 9, 72, 100, true, GemmKernels::Cur),
        ],
    };
    for &(b, l, k, n, bias, gemm) in gated_fp8 {
        let mut inputs =
            vec![act(&[b, l, n]), act(&[b, 6 * n]), act(&[b, l, k]), Input::Act(vec![n, k], 1.0 / (k as f32).sqrt())];
        if bias {
            inputs.push(act(&[n]));
        }
        v.push(
            case(
                "linear_fp8_gated_add",
                format!("[{b}, {l}, {k}] · [{n}, {k}]ᵀ{}{}", if bias { " +bias" } else { "" }, gemm.suffix()),
                inputs,
                4.0,
                Box::new(move |be, t| {
                    let q = be.load_quantized(&quantize(&t[3].to_vec_f32()?, n, k, QuantFormat::Fp8)?)?;
                    let gate = t[1].narrow(1, 2 * n, n)?;
                    with_gemm_kernels(be, gemm, || be.linear_fp8_gated_add(&t[0], &gate, &t[2], &q, t.get(4)))
                }),
            )
            .untimed(),
        );
    }
    // swiglu_linear_fp8 with the gated residual: the single block's output projection (a prefix)
    // and the feed-forward's (none); K = 12 takes the composition. (B, L, prefix width, M, N)
    let swiglu_gated_fp8: &[(usize, usize, usize, usize, usize)] =
        &[(2, 70, 48, 80, 136), (2, 9, 0, 64, 24), (2, 5, 4, 8, 16)];
    for &(b, l, p, m, n) in swiglu_gated_fp8 {
        let k = p + m;
        let inputs = vec![
            act(&[b, l, n]),
            act(&[b, 6 * n]),
            act(&[b, l, p.max(1)]),
            act(&[b, l, 16 + 2 * m]),
            Input::Act(vec![n, k], 1.0 / (k as f32).sqrt()),
        ];
        v.push(
            case(
                "swiglu_linear_fp8_gated_add",
                format!("[{b}, {l}, {p}] + swiglu of [{b}, {l}, {m}·2] · {n}x{k}ᵀ"),
                inputs,
                4.0,
                Box::new(move |be, t| {
                    let q = be.load_quantized(&quantize(&t[4].to_vec_f32()?, n, k, QuantFormat::Fp8)?)?;
                    let (gate, x) = (t[1].narrow(1, 5 * n, n)?, t[3].narrow(2, 16, 2 * m)?);
                    be.swiglu_linear_fp8_gated_add(&t[0], &gate, (p > 0).then_some(&t[2]), &x, &q)
                }),
            )
            .untimed(),
        );
    }
    // sage_kv_sums, sage_kv_means_absmax, then for head dims 64/128 sage_quantize_int8_block (Q, K;
    // "v1-quant": sage_block_absmax + sage_quantize_int8) and on sm_89+ images sage_quantize_vt_e4m3 + attention_sage_mma_d{64,128}
    // (on sm_90a unmasked d 128: attention_sage_wgmma_d128; "v2" keeps attention_sage_mma_d128 there),
    // on older ones (and on every card for "bf16-pv") sage_quantize_vt_e4m3_as_bf16 +
    // attention_sage_mma_bf16pv_d{64,128}; as the reference ("ref") sage_block_absmax + attention_sage_rowwise. (batch,
    // tokens, heads, kv heads, head dim, causal with padding [N, N/2], path)
    use SagePath::{Bf16Pv, Default as Sage, MmaSync as SageV2, QuantizeV1, Reference};
    let sage: &[(usize, usize, usize, usize, usize, bool, SagePath)] = match suite {
        Suite::Full => &[
            (1, 130, 2, 2, 128, false, Sage),
            (2, 200, 4, 2, 64, true, Sage),
            (1, 1024, 2, 2, 128, false, Sage),
            (1, 4608, 4, 4, 128, false, Sage),
            (1, 4608, 4, 4, 128, false, SageV2),
            (2, 300, 4, 1, 128, true, Sage),
            (2, 200, 4, 2, 64, true, Bf16Pv),
            (1, 1024, 2, 2, 128, false, Bf16Pv),
            (2, 200, 4, 2, 64, true, Reference),
            (1, 1024, 2, 2, 128, false, Reference),
            (2, 200, 4, 2, 64, true, QuantizeV1),
        ],
        Suite::Small => &[
            (1, 130, 2, 2, 128, false, Sage),     // 3 blocks of 64 tokens, the last ragged
            (2, 130, 4, 2, 64, true, Sage),       // causal, padding to 65 crossing a block edge, GQA
            (1, 72, 2, 1, 128, false, Sage),      // GQA without a mask, 2 blocks
            (2, 300, 1, 1, 128, false, Sage),     // 5 key tiles through the 4 stages, ragged; 3 query blocks
            (2, 300, 1, 1, 128, false, SageV2),   // the same on v2 where v3 (wgmma) would run
            (2, 100, 2, 1, 128, true, Sage),      // d 128 causal + padding (100, 50), GQA
            (1, 200, 1, 1, 64, false, Sage),      // d 64: 4 key tiles through both stages, ragged
            (2, 300, 2, 1, 64, true, Sage),       // K/V statistics over 2 chunks of 256 tokens, 5 key tiles
            (2, 130, 4, 2, 64, true, Bf16Pv),     // bf16 P·V: causal + padding, GQA
            (1, 130, 2, 1, 128, false, Bf16Pv),   // bf16 P·V: d 128, ragged
            (2, 130, 4, 2, 64, true, Reference),  // row-wise reference: causal + padding, GQA
            (1, 72, 2, 1, 128, false, Reference), // row-wise reference: GQA
            (2, 130, 4, 2, 64, true, QuantizeV1), // first Q/K pre-pass: causal + padding, GQA
        ],
    };
    for &(b, n, h, hkv, d, causal, path) in sage {
        let mask = if causal { AttnMask::Causal { valid_len: Some(vec![n, n / 2]) } } else { AttnMask::None };
        let scale = 1.0 / (d as f32).sqrt();
        let label = format!(
            "B{b} N{n} H{h}/{hkv} D{d}{}{}",
            if causal { " causal+pad" } else { "" },
            match path {
                Sage => "",
                Bf16Pv => " bf16-pv",
                Reference => " ref",
                QuantizeV1 => " v1-quant",
                SageV2 => " v2",
            }
        );
        v.push(case(
            "attention_sage",
            label,
            vec![act(&[b, n, h, d]), act(&[b, n, hkv, d]), act(&[b, n, hkv, d])],
            4.0,
            Box::new(move |be, t| {
                let run = || be.attention_sage(&t[0], &t[1], &t[2], &mask, scale);
                match path {
                    Sage => run(),
                    Bf16Pv => with_sage_bf16_pv(be, run),
                    Reference => with_attention_kernels(be, AttnKernels::Ref, run),
                    QuantizeV1 => with_sage_quantize_v1(be, run),
                    SageV2 => with_attention_kernels(be, AttnKernels::MmaSync, run),
                }
            }),
        ));
    }
    // attention_sage_normed: q and k raw slices of fused projections, normed and rotated per part
    // (sage_norm_rope_int8 for K's sums, then Q's and K's codes; the reference: rms_norm_rope per
    // part, concat, attention_sage). One part (a single block: q, k, v of one [B, N, (H + 2Hkv)·D]
    // projection) or two (a double block: text and image projections, each with its own weights;
    // the first 64-token block straddles them). The device stores q and k in bf16 before their
    // int8 codes, the f32 CPU reference does not: codes near a rounding edge differ, so the error
    // here is the 8-bit path's own noise (~2.7e-2) and the tolerance 10 units; tests/gpu.rs checks
    // the fused kernels bit for bit against the composition on the device.
    // (batch, part lengths, heads, kv heads, head dim)
    let sage_normed: &[(usize, &[usize], usize, usize, usize)] = match suite {
        Suite::Full => &[(1, &[4608], 4, 4, 128), (2, &[512, 1024], 2, 2, 128), (2, &[100, 200], 4, 2, 64)],
        Suite::Small => &[(1, &[120], 4, 2, 128), (2, &[40, 90], 2, 2, 64), (1, &[70, 60], 2, 2, 128)],
    };
    for &(b, lens, h, hkv, d) in sage_normed {
        let n: usize = lens.iter().sum();
        let width = (h + 2 * hkv) * d;
        let mut inputs: Vec<Input> = lens.iter().map(|&l| act(&[b, l, width])).collect();
        inputs.push(Input::Table(vec![n, d / 2], 0.0, 1.0));
        inputs.push(Input::Table(vec![n, d / 2], 0.0, 1.0));
        inputs.extend((0..2 * lens.len()).map(|_| act(&[d]))); // q and k norm weights per part
        let parts = lens.len();
        v.push(case(
            "attention_sage_normed",
            format!("B{b} L{lens:?} H{h}/{hkv} D{d}"),
            inputs,
            10.0,
            Box::new(move |be, t| {
                let slice = |x: &Tensor, at: usize, heads: usize| -> Result<Tensor> {
                    x.narrow(2, at * d, heads * d)?.reshape(&[b, x.dim(1), heads, d])
                };
                let q: Vec<Tensor> = (0..parts).map(|i| slice(&t[i], 0, h)).collect::<Result<_>>()?;
                let k: Vec<Tensor> = (0..parts).map(|i| slice(&t[i], h, hkv)).collect::<Result<_>>()?;
                let v: Vec<Tensor> = (0..parts).map(|i| slice(&t[i], h + hkv, hkv)).collect::<Result<_>>()?;
                let v = if parts == 1 { v[0].clone() } else { be.concat(&v.iter().collect::<Vec<_>>(), 1)? };
                let w = &t[parts + 2..];
                let qp: Vec<QkPart> = (0..parts).map(|i| QkPart { x: &q[i], weight: &w[2 * i] }).collect();
                let kp: Vec<QkPart> = (0..parts).map(|i| QkPart { x: &k[i], weight: &w[2 * i + 1] }).collect();
                let rope = QkRope { eps: 1e-6, cos: &t[parts], sin: &t[parts + 1], pairs: RopePairs::Interleaved };
                be.attention_sage_normed(&qp, &kp, &rope, &v, 1.0 / (d as f32).sqrt())
            }),
        ));
    }
    // attention_sage_normed_linear_fp8_gated_add: the double block's Sage attention (text and image
    // parts) feeding its two FP8 output projections with their gated residuals; the output is both
    // projections' results, concatenated over tokens. On sm_89+ images the attention kernel writes
    // the e4m3 rows (attention_sage_mma_e4m3out_d{64,128}; on sm_90a at d 128
    // attention_sage_wgmma_e4m3out_d128, "v2" keeps the mma.sync one), then gemm_w8a8_mma_gated_e4m3
    // (gemm_wgmma_gated_e4m3 on sm_90a) per part; elsewhere, and at head dims the tensor-core kernels
    // do not take (d 16), the composition. Query tiles of 128 straddle the split and end ragged.
    // Tolerance: attention_sage_normed's. (batch, text and image tokens, heads, head dim, N, kernels)
    type SageFp8Out = (usize, [usize; 2], usize, usize, usize, AttnKernels);
    let sage_fp8_out: &[SageFp8Out] = match suite {
        Suite::Full => &[
            (1, [512, 1024], 4, 128, 512, AttnKernels::Cur),
            (1, [512, 1024], 4, 128, 512, AttnKernels::MmaSync),
            (2, [100, 200], 4, 64, 256, AttnKernels::Cur),
            (1, [30, 50], 2, 16, 32, AttnKernels::Cur),
        ],
        Suite::Small => &[
            (1, [70, 60], 2, 128, 64, AttnKernels::Cur), // one ragged tile past the first, split inside tile 0
            (2, [40, 150], 1, 128, 48, AttnKernels::MmaSync), // v2 d 128 where v3 would run; two samples, 2 tiles each
            (2, [40, 90], 2, 64, 48, AttnKernels::Cur),  // d 64 (v2), two samples
            (1, [30, 50], 2, 16, 32, AttnKernels::Cur),  // d 16: the composition
        ],
    };
    for &(b, lens, h, d, n, kernels) in sage_fp8_out {
        let (nq, cols) = (lens[0] + lens[1], h * d);
        let mut inputs: Vec<Input> = lens.iter().map(|&l| act(&[b, l, 3 * cols])).collect();
        inputs.push(Input::Table(vec![nq, d / 2], 0.0, 1.0));
        inputs.push(Input::Table(vec![nq, d / 2], 0.0, 1.0));
        inputs.extend((0..4).map(|_| act(&[d]))); // q and k norm weights per part
        inputs.extend(fp8_projection_inputs(b, lens, n, cols));
        v.push(
            case(
                "attention_sage_normed_linear_fp8_gated_add",
                format!(
                    "B{b} L{lens:?} H{h} D{d} -> {n}{}",
                    if matches!(kernels, AttnKernels::MmaSync) { " v2" } else { "" }
                ),
                inputs,
                10.0,
                Box::new(move |be, t| {
                    let slice = |x: &Tensor, at: usize| -> Result<Tensor> {
                        x.narrow(2, at * cols, cols)?.reshape(&[b, x.dim(1), h, d])
                    };
                    let q = [slice(&t[0], 0)?, slice(&t[1], 0)?];
                    let k = [slice(&t[0], 1)?, slice(&t[1], 1)?];
                    let v = be.concat(&[&slice(&t[0], 2)?, &slice(&t[1], 2)?], 1)?;
                    let qp = [QkPart { x: &q[0], weight: &t[4] }, QkPart { x: &q[1], weight: &t[6] }];
                    let kp = [QkPart { x: &k[0], weight: &t[5] }, QkPart { x: &k[1], weight: &t[7] }];
                    let rope = QkRope { eps: 1e-6, cos: &t[2], sin: &t[3], pairs: RopePairs::Interleaved };
                    with_fp8_projections(be, &t[8..], n, cols, |outs| {
                        with_attention_kernels(be, kernels, || {
                            let scale = 1.0 / (d as f32).sqrt();
                            let [first, second] =
                                be.attention_sage_normed_linear_fp8_gated_add(&qp, &kp, &rope, &v, scale, outs)?;
                            be.concat(&[&first, &second], 1)
                        })
                    })
                }),
            )
            .untimed(),
        );
    }
    // attention_linear_fp8_gated_add: the same with exact attention (`--attention exact`): on sm_89+
    // images flash_attention_v3_e4m3out_d{64,128} (on sm_90a flash_attention_v4_e4m3out_d{64,128},
    // "v2" keeps v3 there) writes the e4m3 rows; elsewhere, and at d 16, the composition.
    // (batch, text and image tokens, heads, head dim, N, kernels)
    let flash_fp8_out: &[SageFp8Out] = match suite {
        Suite::Full => &[
            (1, [512, 1024], 4, 128, 512, AttnKernels::Cur),
            (1, [512, 1024], 4, 128, 512, AttnKernels::MmaSync),
            (2, [100, 200], 4, 64, 256, AttnKernels::Cur),
            (1, [30, 50], 2, 16, 32, AttnKernels::Cur),
        ],
        Suite::Small => &[
            (1, [70, 60], 2, 128, 64, AttnKernels::Cur), // v4 d 128 on sm_90a, v3 elsewhere
            (2, [40, 150], 1, 128, 48, AttnKernels::MmaSync), // v3 d 128 where v4 would run
            (2, [40, 90], 2, 64, 48, AttnKernels::Cur),  // d 64, two samples
            (2, [40, 90], 2, 64, 48, AttnKernels::MmaSync), // v3 d 64 where v4 would run
            (1, [30, 50], 2, 16, 32, AttnKernels::Cur),  // d 16: the composition
        ],
    };
    for &(b, lens, h, d, n, kernels) in flash_fp8_out {
        let (nq, cols) = (lens[0] + lens[1], h * d);
        let mut inputs: Vec<Input> = (0..3).map(|_| act(&[b, nq, h, d])).collect();
        inputs.extend(fp8_projection_inputs(b, lens, n, cols));
        v.push(
            case(
                "attention_linear_fp8_gated_add",
                format!(
                    "B{b} L{lens:?} H{h} D{d} -> {n}{}",
                    if matches!(kernels, AttnKernels::MmaSync) { " v3" } else { "" }
                ),
                inputs,
                4.0,
                Box::new(move |be, t| {
                    with_fp8_projections(be, &t[3..], n, cols, |outs| {
                        with_attention_kernels(be, kernels, || {
                            let scale = 1.0 / (d as f32).sqrt();
                            let [first, second] =
                                be.attention_linear_fp8_gated_add(&t[0], &t[1], &t[2], scale, outs)?;
                            be.concat(&[&first, &second], 1)
                        })
                    })
                }),
            )
            .untimed(),
        );
    }
    // (batch, queries, keys, heads, kv heads, head dim, mask: 0 none, 1 causal, 2 causal + padding,
    // kernels). Head dims 64 and 128 run flash_attention_v3_d{64,128}[_masked] (128-query
    // blocks; 64-key tiles at d 64, 32-key tiles at d 128), or unmasked on sm_90a images
    // flash_attention_v4_d{64,128} (wgmma: 128-query blocks of two warpgroups, 128-key tiles at
    // d 64, 64-key tiles at d 128, after transpose_v; "v3" keeps v3 there), unmasked 256/384/512
    // flash_attention_wide_d* (32 or 64-query blocks, 32-key tiles), every other one
    // attention_rowwise. "reference" runs the previous versions on the CUDA backend (flash v2 for
    // 64/128, attention_rowwise for the wide heads), which stay as fallbacks.
    use AttnKernels::*;
    let attn: &[(usize, usize, usize, usize, usize, usize, u8, AttnKernels)] = match suite {
        Suite::Full => &[
            (1, 77, 77, 3, 3, 64, 0, Cur),
            (2, 130, 130, 4, 2, 128, 1, Cur),
            (1, 200, 200, 2, 2, 128, 0, Cur),
            (2, 40, 40, 2, 1, 24, 1, Cur),
            (1, 64, 64, 1, 1, 512, 0, Cur),
            (1, 33, 95, 3, 3, 16, 0, Cur),
            (1, 4608, 4608, 2, 2, 128, 0, Cur),
            (2, 512, 512, 4, 1, 128, 2, Cur),
            (1, 4096, 4096, 1, 1, 64, 0, Cur),
            (2, 300, 300, 4, 2, 64, 2, Cur),
            (1, 4096, 4096, 1, 1, 512, 0, Cur), // the VAE mid-block at 512²
            (1, 1000, 1500, 1, 1, 512, 0, Cur),
            (2, 300, 300, 2, 1, 256, 0, Cur),
            (1, 200, 333, 2, 2, 384, 0, Cur),
            (1, 40, 40, 1, 1, 512, 1, Cur),
            (2, 512, 512, 4, 1, 128, 2, Ref),
            (1, 1000, 1000, 2, 2, 64, 0, Ref),
            (1, 1024, 1024, 1, 1, 512, 0, Ref),
        ],
        Suite::Small => &[
            (1, 77, 77, 3, 3, 64, 0, Cur),       // v3 d64: ragged query block, ragged second key tile
            (2, 130, 130, 2, 1, 128, 1, Cur),    // v3 d128 masked: causal, GQA, 5 key tiles
            (1, 70, 130, 2, 2, 128, 0, Cur),     // v3 d128: Nq != Nk, ragged last key tile
            (2, 40, 40, 2, 1, 24, 1, Cur),       // rowwise: causal, GQA
            (1, 64, 64, 1, 1, 512, 0, Cur),      // wide d512: whole query blocks and key tiles
            (1, 33, 95, 3, 3, 16, 0, Cur),       // rowwise: Nq != Nk
            (1, 128, 128, 2, 2, 128, 0, Cur),    // v3 d128: one whole query block, whole key tiles
            (2, 130, 130, 4, 1, 64, 2, Cur),     // v3 d64 masked: causal + padding (68, 46), GQA 4:1
            (1, 130, 130, 1, 1, 64, 0, Cur),     // v3 d64: 2 query blocks, 3 key tiles
            (2, 40, 40, 2, 1, 24, 2, Cur),       // rowwise: causal + padding (23, 16)
            (2, 150, 150, 2, 1, 128, 2, Cur),    // v3 d128 masked: causal + padding (78, 53)
            (1, 70, 100, 1, 1, 512, 0, Cur),     // wide d512: ragged query block, 4 key tiles, ragged last
            (1, 20, 9, 1, 1, 512, 0, Cur),       // wide d512: one key tile, mostly zero-filled
            (1, 45, 77, 2, 1, 256, 0, Cur),      // wide d256: 64-query block, GQA, 3 key tiles
            (1, 33, 70, 2, 2, 384, 0, Cur),      // wide d384: 6 warps, 2 query blocks, 3 key tiles
            (1, 40, 40, 1, 1, 512, 1, Cur),      // rowwise: D 512 with a mask (the wide kernel has none)
            (2, 130, 130, 4, 1, 64, 2, Ref),     // flash v2 d64: causal + padding, GQA
            (1, 70, 130, 2, 2, 128, 0, Ref),     // flash v2 d128: Nq != Nk, ragged last key tile
            (1, 64, 64, 1, 1, 512, 0, Ref),      // rowwise: D 512 (16 values per lane)
            (2, 100, 150, 4, 2, 128, 0, Cur), // v4 d128: GQA, batch 2 (the first sequence's last tile reads the next's keys)
            (2, 90, 200, 2, 1, 64, 0, Cur),   // v4 d64: GQA, batch 2, ragged second 128-key tile
            (1, 64, 450, 2, 2, 128, 0, Cur),  // v4 d128: 8 key tiles, the 3-stage ring wraps twice
            (1, 40, 900, 2, 1, 64, 0, Cur),   // v4 d64: 8 key tiles of 128, GQA
            (1, 77, 77, 3, 3, 64, 0, MmaSync), // v3 d64 where v4 would run
            (1, 70, 130, 2, 2, 128, 0, MmaSync), // v3 d128 where v4 would run
        ],
    };
    for &(b, nq, nk, h, hkv, d, mask, kernels) in attn {
        let mask = match mask {
            0 => AttnMask::None,
            1 => AttnMask::Causal { valid_len: None },
            _ => AttnMask::Causal { valid_len: Some((0..b).map(|i| nk / (i + 2) + 3).collect()) },
        };
        let label = format!(
            "B{b} Nq{nq} Nk{nk} H{h}/{hkv} D{d} {}{}",
            match &mask {
                AttnMask::None => "full".into(),
                AttnMask::Causal { valid_len } => format!("causal{}", if valid_len.is_some() { "+pad" } else { "" }),
            },
            match kernels {
                Cur => "",
                Ref => " ref",
                MmaSync => " v3",
            }
        );
        let scale = 1.0 / (d as f32).sqrt();
        v.push(case(
            "attention",
            label,
            vec![act(&[b, nq, h, d]), act(&[b, nk, hkv, d]), act(&[b, nk, hkv, d])],
            3.0,
            Box::new(move |be, t| {
                let run = || be.attention(&t[0], &t[1], &t[2], &mask, scale);
                with_attention_kernels(be, kernels, run)
            }),
        ));
    }
    // group_norm_stats (chunks of 16384 per group), group_norm_finalize, group_norm_apply (v1 for
    // the 17x9 planes, the x8 version for the others)
    let group_norms: Vec<(Vec<usize>, usize)> = match suite {
        Suite::Full => vec![(vec![1, 64, 17, 9], 32), (vec![2, 32, 8, 8], 8), (vec![1, 128, 64, 64], 32)],
        // The last: groups of 18432 elements, two stats blocks each (partial sums added atomically).
        Suite::Small => vec![(vec![1, 64, 17, 9], 32), (vec![2, 32, 8, 8], 8), (vec![1, 8, 64, 72], 2)],
    };
    for (shape, groups) in group_norms {
        let c = shape[1];
        for silu in [false, true] {
            v.push(case(
                "group_norm",
                format!("{shape:?} g{groups}{}", if silu { " +silu" } else { "" }),
                vec![act(&shape), act(&[c]), act(&[c])],
                2.0,
                Box::new(move |be, t| be.group_norm(&t[0], groups, &t[1], &t[2], 1e-6, silu)),
            ));
        }
    }
    // layer_norm (one block per row: 256 threads striding, and 128), modulate, gated_add (C % 8
    // == 0: the x8 kernels; C = 100: v1)
    let rows = match suite {
        Suite::Full => [vec![2, 33, 3072], vec![1, 5, 100]],
        Suite::Small => [vec![2, 33, 296], vec![1, 5, 100]],
    };
    for shape in rows {
        let (b, c) = (shape[0], shape[2]);
        v.push(case(
            "layer_norm",
            format!("{shape:?}"),
            vec![act(&shape)],
            2.0,
            Box::new(|be, t| be.layer_norm(&t[0], 1e-6)),
        ));
        v.push(case(
            "layer_norm_modulate",
            format!("{shape:?}"),
            vec![act(&shape), act(&[b, c]), act(&[b, c])],
            2.0,
            Box::new(|be, t| be.layer_norm_modulate(&t[0], &t[1], &t[2], 1e-6)),
        ));
        v.push(case(
            "modulate",
            format!("{shape:?}"),
            vec![act(&shape), act(&[b, c]), act(&[b, c])],
            2.0,
            Box::new(|be, t| be.modulate(&t[0], &t[1], &t[2])),
        ));
        v.push(case(
            "gated_add",
            format!("{shape:?}"),
            vec![act(&shape), act(&[b, c]), act(&shape)],
            2.0,
            Box::new(|be, t| be.gated_add(&t[0], &t[1], &t[2])),
        ));
    }
    // linear_gated_add (the residual in the GEMM's epilogue): ragged 128-tiles, the gate a strided
    // chunk of a [B, 6N] modulation tensor as the DiT passes it, a bias; K = 13 takes the
    // composition (gemm_tiled, then gated_add); N = 100 leaves rows of X not 16-byte aligned and a
    // partial last store per row. (B, L, K, N, bias)
    let gated: &[(usize, usize, usize, usize, bool)] = match suite {
        Suite::Full => {
            &[(1, 300, 3072, 3072, false), (2, 33, 64, 96, true), (2, 5, 13, 24, false), (2, 9, 64, 100, true)]
        }
        Suite::Small => &[
            (2, 70, 72, 136, false),
            (2, 70, 512, 136, true),
            (2, 33, 64, 96, true),
            (2, 5, 13, 24, false),
            (2, 9, 64, 100, true),
        ],
    };
    // (On sm_90a the K % 8 == 0 cases run v3, gemm_wgmma_gated, K = 512 split over 8 blocks by
    // stream-K; the "v2" case gemm_mma_gated there, the "v3-wide" one gemm_wgmma_gated_bf16_wide.)
    let gated = gated
        .iter()
        .map(|&c| (c, GemmKernels::Cur))
        .chain([((2, 70, 72, 136, false), GemmKernels::V2), ((2, 70, 384, 300, true), GemmKernels::Wide)]);
    for ((b, l, k, n, bias), gemm) in gated {
        let mut inputs =
            vec![act(&[b, l, n]), act(&[b, 6 * n]), act(&[b, l, k]), Input::Act(vec![n, k], 1.0 / (k as f32).sqrt())];
        if bias {
            inputs.push(act(&[n]));
        }
        v.push(case(
            "linear_gated_add",
            format!("[{b}, {l}, {k}] · [{n}, {k}]ᵀ{}{}", if bias { " +bias" } else { "" }, gemm.suffix()),
            inputs,
            3.0,
            Box::new(move |be, t| {
                let gate = t[1].narrow(1, 2 * n, n)?;
                let run = || be.linear_gated_add(&t[0], &gate, &t[2], &t[3], t.get(4));
                with_gemm_kernels(be, gemm, run)
            }),
        ));
    }
    // Modulation vectors as strided chunks of one [B, 6C] tensor, as the DiT produces them.
    v.push(case(
        "layer_norm_modulate",
        "[2, 9, 48] strided vectors",
        vec![act(&[2, 9, 48]), act(&[2, 288])],
        2.0,
        Box::new(|be, t| {
            let c = t[1].chunk(6, 1)?;
            be.layer_norm_modulate(&t[0], &c[0], &c[1], 1e-6)
        }),
    ));
    // Shift and scale with different row strides (a dense vector and a chunk).
    for op in ["layer_norm_modulate", "modulate"] {
        v.push(case(
            op,
            "[2, 9, 48] mixed strides",
            vec![act(&[2, 9, 48]), act(&[2, 48]), act(&[2, 144])],
            2.0,
            Box::new(move |be, t| {
                let scale = t[2].narrow(1, 48, 48)?;
                match op {
                    "modulate" => be.modulate(&t[0], &t[1], &scale),
                    _ => be.layer_norm_modulate(&t[0], &t[1], &scale, 1e-6),
                }
            }),
        ));
    }
    let rms = match suite {
        Suite::Full => [vec![1, 40, 24, 128], vec![3, 2560], vec![2, 7, 3, 24]],
        Suite::Small => [vec![1, 40, 6, 128], vec![3, 480], vec![2, 7, 3, 24]],
    };
    for shape in rms {
        let c = *shape.last().unwrap();
        v.push(case(
            "rms_norm",
            format!("{shape:?}"),
            vec![act(&shape), act(&[c])],
            2.0,
            Box::new(|be, t| be.rms_norm(&t[0], Some(&t[1]), 1e-6)),
        ));
    }
    v.push(case(
        "rms_norm",
        "[5, 64] no weight",
        vec![act(&[5, 64])],
        2.0,
        Box::new(|be, t| be.rms_norm(&t[0], None, 1e-6)),
    ));
    let pointwise = match suite {
        Suite::Full => [vec![3, 1001], vec![2, 4608, 64]],
        Suite::Small => [vec![3, 1001], vec![2, 130, 64]],
    };
    for shape in pointwise {
        v.push(case("silu", format!("{shape:?}"), vec![act(&shape)], 1.0, Box::new(|be, t| be.silu(&t[0]))));
        v.push(case(
            "axpby",
            format!("{shape:?}"),
            vec![act(&shape), act(&shape)],
            1.0,
            Box::new(|be, t| be.axpby(0.75, &t[0], -1.25, &t[1])),
        ));
    }
    let swiglu = match suite {
        Suite::Full => [vec![3, 14], vec![2, 9, 18432]],
        Suite::Small => [vec![3, 14], vec![2, 9, 576]],
    };
    for shape in swiglu {
        v.push(case("swiglu", format!("{shape:?}"), vec![act(&shape)], 1.0, Box::new(|be, t| be.swiglu(&t[0]))));
    }
    // swiglu_concat ([attention out | swiglu(MLP slice)]): swiglu_concat_bf16x8 on the slice of a
    // fused projection read in place, and the composition for a 12-wide prefix. (prefix width)
    for p in [24usize, 12] {
        v.push(case(
            "swiglu_concat",
            format!("[2, 9, {p}] + swiglu of [2, 9, 112] narrowed to 64"),
            vec![act(&[2, 9, p]), act(&[2, 9, 112])],
            1.0,
            Box::new(|be, t| be.swiglu_concat(&t[0], &t[1].narrow(2, 48, 64)?)),
        ));
    }
    // Strided views: read in place by swiglu_bf16x8 (aligned rows, as the DiT's slice of its
    // fused projection), else made dense (strided_copy_b16) for v1.
    v.push(case(
        "swiglu",
        "[2, 3, 40] narrowed to [2, 3, 32]",
        vec![act(&[2, 3, 40])],
        1.0,
        Box::new(|be, t| be.swiglu(&t[0].narrow(2, 8, 32)?)),
    ));
    if small {
        v.push(case(
            "swiglu",
            "[3, 20] narrowed to [3, 14]",
            vec![act(&[3, 20])],
            1.0,
            Box::new(|be, t| be.swiglu(&t[0].narrow(1, 3, 14)?)),
        ));
    }
    let ropes = match suite {
        Suite::Full => [
            (vec![2, 37, 3, 128], true),
            (vec![1, 37, 3, 128], false),
            (vec![1, 9, 2, 16], true),
            (vec![2, 512, 8, 128], false),
        ],
        Suite::Small => [
            (vec![2, 37, 3, 128], true),
            (vec![1, 37, 3, 128], false),
            (vec![1, 9, 2, 16], true),
            (vec![2, 130, 2, 128], false),
        ],
    };
    for (shape, interleaved) in ropes {
        let (n, d) = (shape[1], shape[3]);
        let tables = vec![act(&shape), Input::Table(vec![n, d / 2], 0.0, 1.0), Input::Table(vec![n, d / 2], 0.0, 1.0)];
        let name = if interleaved { "rope_interleaved" } else { "rope_half" };
        v.push(case(
            name,
            format!("{shape:?}"),
            tables,
            1.0,
            Box::new(move |be, t| {
                if interleaved {
                    be.rope_interleaved(&t[0], &t[1], &t[2])
                } else {
                    be.rope_half(&t[0], &t[1], &t[2])
                }
            }),
        ));
    }
    // rms_norm_rope (the fused q/k path; the reference is rms_norm then rope): dense; the k slice
    // of a fused [B, L, 3·H·D] projection, read in place; a permuted view (made dense first); no
    // weight; a head dim of 24 (fewer pairs than lanes). (label, stored shape, view, interleaved, weight)
    let hd = if small { 64 } else { 128 };
    type FusedRopeCase = (&'static str, Vec<usize>, Vec<usize>, bool, bool);
    let fused_rope: Vec<FusedRopeCase> = vec![
        ("dense", vec![2, 9, 3, hd], vec![2, 9, 3, hd], true, true),
        ("k slice", vec![2, 9, 9 * hd], vec![2, 9, 3, hd], true, true),
        ("permuted", vec![2, 3, 9, 32], vec![2, 9, 3, 32], false, true),
        ("no weight", vec![1, 7, 4, hd], vec![1, 7, 4, hd], false, false),
        ("d 24", vec![2, 7, 3, 24], vec![2, 7, 3, 24], true, true),
    ];
    for (label, stored, view, interleaved, weight) in fused_rope {
        let (n, d) = (view[1], view[3]);
        let mut inputs =
            vec![act(&stored), Input::Table(vec![n, d / 2], 0.0, 1.0), Input::Table(vec![n, d / 2], 0.0, 1.0)];
        if weight {
            inputs.push(act(&[d]));
        }
        let pairs = if interleaved { RopePairs::Interleaved } else { RopePairs::Halves };
        v.push(case(
            "rms_norm_rope",
            format!("{label} {view:?} {pairs:?}"),
            inputs,
            2.0,
            Box::new(move |be, t| {
                let x = match label {
                    "k slice" => t[0].narrow(2, 3 * d, 3 * d)?.reshape(&view)?,
                    "permuted" => t[0].permute(&[0, 2, 1, 3])?,
                    _ => t[0].clone(),
                };
                be.rms_norm_rope(&x, t.get(3), 1e-6, &t[1], &t[2], pairs)
            }),
        ));
    }
    for dim in [256, 33] {
        v.push(case(
            "timestep_embedding",
            format!("t=[1000, 968, 3.5] dim {dim}"),
            vec![],
            1.0,
            Box::new(move |be, _| {
                let t = be.upload(&Tensor::from_f32(vec![1000.0, 968.0, 3.5], &[3])?, DType::F32)?;
                be.timestep_embedding(&t, dim, 10000.0)
            }),
        ));
    }
    v.push(case(
        "embedding",
        "vocab 1000 x 64, 37 ids",
        vec![act(&[1000, 64])],
        0.0,
        Box::new(|be, t| {
            let ids: Vec<u32> = (0..37u32).map(|i| (i * 7919) % 1000).collect();
            be.embedding(&ids, &t[0])
        }),
    ));
    v.push(case(
        "channel_affine",
        "[2, 16, 5, 7]",
        vec![act(&[2, 16, 5, 7]), Input::Table(vec![16], 1.0, 0.3), Input::Table(vec![16], 0.0, 0.3)],
        1.0,
        Box::new(|be, t| be.channel_affine(&t[0], &t[1], &t[2])),
    ));
    // Rows of 9 pixels: v1; of 12: upsample_nearest2x_bf16x8.
    for shape in [[1, 5, 7, 9], [2, 3, 5, 12]] {
        v.push(case(
            "upsample_nearest2x",
            format!("{shape:?}"),
            vec![act(&shape)],
            0.0,
            Box::new(|be, t| be.upsample_nearest2x(&t[0])),
        ));
    }
    // Convolutions with a per-row bias (input, weight, stride, padding, v2 asked for). The implicit
    // GEMM (v2) takes those with more than 8 output channels but the 7x7 stride-4 kernel, whose
    // input patch does not fit in shared memory: that one runs im2col + gemm_tiled (v1, K = 196).
    // At most 4 / 8 output channels and ≤ 25 taps: conv2d_narrow_c4 / c8 (CUDA cores), unless v2 is
    // asked for ("v2").
    let last_conv = match suite {
        Suite::Full => (vec![1, 128, 64, 64], vec![128, 128, 3, 3]),
        // Two channel chunks (the second ragged), 2 x 2 pixel tiles, 2 channel blocks (the second
        // ragged).
        Suite::Small => (vec![1, 48, 12, 20], vec![136, 48, 3, 3]),
    };
    let asymmetric = Padding2d { top: 0, bottom: 1, left: 0, right: 1 };
    type ConvCase = (Vec<usize>, Vec<usize>, usize, Padding2d, bool);
    let convs: [ConvCase; 10] = [
        (vec![1, 3, 17, 13], vec![8, 3, 3, 3], 1, Padding2d::same(1), false), // narrow c8
        (vec![1, 3, 17, 13], vec![8, 3, 3, 3], 1, Padding2d::same(1), true),
        (vec![2, 16, 16, 16], vec![32, 16, 3, 3], 1, Padding2d::same(1), false),
        (vec![1, 16, 15, 15], vec![16, 16, 3, 3], 2, asymmetric, false),
        (vec![1, 16, 15, 15], vec![6, 16, 3, 3], 2, asymmetric, false), // narrow c8, stride 2
        (vec![1, 64, 9, 11], vec![32, 64, 1, 1], 1, Padding2d::same(0), false),
        (vec![1, 64, 9, 11], vec![4, 64, 1, 1], 1, Padding2d::same(0), false), // narrow c4, 1x1
        (vec![1, 4, 23, 29], vec![8, 4, 7, 7], 4, Padding2d::same(3), false),
        // The VAE decoder's conv_out shape in small: 3 channels, two input chunks (the second ragged).
        (vec![2, 40, 13, 21], vec![3, 40, 3, 3], 1, Padding2d::same(1), false),
        (last_conv.0, last_conv.1, 1, Padding2d::same(1), false),
    ];
    for (x, w, stride, pad, v2) in convs {
        let fan_in = (w[1] * w[2] * w[3]) as f32;
        let label = format!("{x:?} * {w:?} s{stride}{}", if v2 { " v2" } else { "" });
        let cout = w[0];
        v.push(case(
            "conv2d",
            label,
            vec![act(&x), Input::Act(w.clone(), 1.0 / fan_in.sqrt()), act(&[cout])],
            3.0,
            Box::new(move |be, t| {
                let run = || be.conv2d(&t[0], &t[1], Some(&t[2]), stride, pad);
                #[cfg(feature = "cuda")]
                if v2 {
                    return with_cuda_switch(be, crate::backend::cuda::CudaBackend::set_conv_v2, run);
                }
                run()
            }),
        ));
    }
    v.push(case(
        "contiguous",
        "permuted [3, 5, 7]",
        vec![act(&[3, 5, 7])],
        0.0,
        Box::new(|be, t| be.contiguous(&t[0].permute(&[2, 0, 1])?)),
    ));
    v.push(case(
        "contiguous",
        "patchify view [1, 4, 8, 6] (6-D)",
        vec![act(&[1, 4, 8, 6])],
        0.0,
        Box::new(|be, t| be.contiguous(&t[0].reshape(&[1, 4, 4, 2, 3, 2])?.permute(&[0, 1, 3, 5, 2, 4])?)),
    ));
    // A narrow of the last dim: rows merged into one dim, copied in 16-byte units (strided_copy_x16),
    // as the DiT's q/k/v slices of its fused projection; and the same in f32.
    v.push(case(
        "contiguous",
        "[2, 5, 48] narrowed to [2, 5, 24]",
        vec![act(&[2, 5, 48])],
        0.0,
        Box::new(|be, t| be.contiguous(&t[0].narrow(2, 16, 24)?)),
    ));
    v.push(case(
        "contiguous",
        "f32 [3, 4, 20] narrowed to [3, 4, 8]",
        vec![Input::Table(vec![3, 4, 20], 0.0, 1.0)],
        0.0,
        Box::new(|be, t| be.contiguous(&t[0].narrow(2, 4, 8)?)),
    ));
    if small {
        // 4-byte elements (strided_copy_b32), which no other case copies.
        v.push(case(
            "contiguous",
            "permuted f32 [3, 5, 7]",
            vec![Input::Table(vec![3, 5, 7], 0.0, 1.0)],
            0.0,
            Box::new(|be, t| be.contiguous(&t[0].permute(&[2, 0, 1])?)),
        ));
    }
    v.push(case(
        "concat",
        "[2, 3, 8] + [2, 5, 8] on dim 1",
        vec![act(&[2, 3, 8]), act(&[2, 5, 8])],
        0.0,
        Box::new(|be, t| be.concat(&[&t[0], &t[1]], 1)),
    ));
    v.push(case(
        "concat",
        "[4, 6] + [4, 2] on dim 1",
        vec![act(&[4, 6]), act(&[4, 2])],
        0.0,
        Box::new(|be, t| be.concat(&[&t[0], &t[1]], 1)),
    ));
    // nonfinite_check_b16 / _b32: NaN, +inf and -inf at the ends and the middle of a ragged length,
    // a clean tensor, a NaN outside a strided view (not reported), and the smallest id kept.
    let lengths: &[usize] = if small { &[1, 777] } else { &[1, 777, 3 << 20] };
    for &n in lengths {
        v.push(
            case(
                "record_nonfinite",
                format!("{n} elements, bf16 and f32"),
                vec![act(&[n])],
                0.0,
                Box::new(move |be, t| nonfinite_probe(be, &t[0].to_vec_f32()?)),
            )
            .untimed(),
        );
    }
    v
}

/// The inputs of a double block's two FP8 output projections for the attention + projection cases:
/// each part's residual `[b, l, n]`, the modulation `[b, 6n]` (gates at 2n and 5n), the weights
/// `[n, cols]`.
fn fp8_projection_inputs(b: usize, lens: [usize; 2], n: usize, cols: usize) -> Vec<Input> {
    let mut inputs: Vec<Input> = lens.iter().map(|&l| act(&[b, l, n])).collect();
    inputs.push(act(&[b, 6 * n]));
    inputs.extend((0..2).map(|_| Input::Act(vec![n, cols], 1.0 / (cols as f32).sqrt())));
    inputs
}

/// `f` of the projections made from `fp8_projection_inputs`' tensors `t` (weights quantized to FP8).
fn with_fp8_projections(
    be: &dyn Backend,
    t: &[Tensor],
    n: usize,
    cols: usize,
    f: impl FnOnce([GatedFp8; 2]) -> Result<Tensor>,
) -> Result<Tensor> {
    let w = (0..2)
        .map(|i| be.load_quantized(&quantize(&t[3 + i].to_vec_f32()?, n, cols, QuantFormat::Fp8)?))
        .collect::<Result<Vec<_>>>()?;
    let gates = [t[2].narrow(1, 2 * n, n)?, t[2].narrow(1, 5 * n, n)?];
    f([GatedFp8 { x: &t[0], gate: &gates[0], w: &w[0] }, GatedFp8 { x: &t[1], gate: &gates[1], w: &w[1] }])
}

/// Which attention kernels a selftest case (or a `profile attention` row) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernels {
    /// The backend's choice for the card.
    Cur,
    /// The previous versions (flash v2, row-wise for the wide heads).
    Ref,
    /// The mma.sync kernels (flash v3, Sage v2) where the wgmma ones (flash v4, Sage v3; sm_90a)
    /// would run.
    MmaSync,
}

/// Which Sage kernels a selftest case runs.
#[derive(Clone, Copy)]
enum SagePath {
    /// The backend's choice for the card.
    Default,
    /// P·V on bf16 tensor cores (the sm_80/86 kernels) whatever the card.
    Bf16Pv,
    /// The row-wise reference.
    Reference,
    /// The tensor-core kernels after the first version of the Q/K pre-pass (its reference).
    QuantizeV1,
    /// v2 (mma.sync) where v3 (wgmma, sm_90a) would run.
    MmaSync,
}

/// Run `f` with one of the CUDA backend's kernel-choice switches on (`set`), then off again;
/// other backends run `f` as is.
#[cfg(feature = "cuda")]
pub(crate) fn with_cuda_switch<T>(
    be: &dyn Backend,
    set: fn(&crate::backend::cuda::CudaBackend, bool),
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if let Some(c) = be.as_any().downcast_ref::<crate::backend::cuda::CudaBackend>() {
        set(c, true);
        let r = f();
        set(c, false);
        return r;
    }
    f()
}

/// Run `f` with Sage's P·V on bf16 tensor cores on the CUDA backend (the Ampere kernels, checked on
/// every card).
pub fn with_sage_bf16_pv(be: &dyn Backend, f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return with_cuda_switch(be, crate::backend::cuda::CudaBackend::set_sage_bf16_pv, f);
    #[cfg(not(feature = "cuda"))]
    f()
}

/// Run `f` with Sage's Q/K pre-pass in its first version (block |x|max, then codes: two launches).
pub fn with_sage_quantize_v1(be: &dyn Backend, f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return with_cuda_switch(be, crate::backend::cuda::CudaBackend::set_sage_quantize_v1, f);
    #[cfg(not(feature = "cuda"))]
    f()
}

/// Which GEMM kernels a case runs on (the CUDA backend's switches; other backends ignore them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernels {
    /// The backend's choice.
    Cur,
    /// v2 (mma.sync) where v3 (wgmma, sm_90a) would run.
    V2,
    /// v3 walking whole tiles where it would split K slices over blocks (stream-K's reference).
    WholeTiles,
    /// v3 on 128x256 tiles whatever the shape (the wide kernels' check on small shapes).
    Wide,
    /// v3 on 128x128 tiles only, where 128x256 ones would run (their reference).
    Narrow,
}

impl GemmKernels {
    fn suffix(self) -> &'static str {
        match self {
            GemmKernels::Cur => "",
            GemmKernels::V2 => " v2",
            GemmKernels::WholeTiles => " v3-tiles",
            GemmKernels::Wide => " v3-wide",
            GemmKernels::Narrow => " v3-narrow",
        }
    }
}

/// Run `f` with the GEMMs on `kernels`.
pub fn with_gemm_kernels(be: &dyn Backend, kernels: GemmKernels, f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        use crate::backend::cuda::CudaBackend;
        match kernels {
            GemmKernels::Cur => f(),
            GemmKernels::V2 => with_cuda_switch(be, CudaBackend::set_gemm_v2, f),
            GemmKernels::WholeTiles => with_cuda_switch(be, CudaBackend::set_gemm_whole_tiles, f),
            GemmKernels::Wide => with_cuda_switch(be, CudaBackend::set_gemm_wide_tiles, f),
            GemmKernels::Narrow => with_cuda_switch(be, CudaBackend::set_gemm_narrow_tiles, f),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (be, kernels);
        f()
    }
}

/// Run `f` with the attention kernels `kernels` (`Cur`: the backend's choice; `Ref`: the previous
/// versions, the references of the current ones; `MmaSync`: flash v3 and Sage v2 where the wgmma
/// kernels would run).
pub fn with_attention_kernels(
    be: &dyn Backend,
    kernels: AttnKernels,
    f: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        use crate::backend::cuda::CudaBackend;
        match kernels {
            AttnKernels::Cur => f(),
            AttnKernels::Ref => with_cuda_switch(be, CudaBackend::set_reference_attention, f),
            AttnKernels::MmaSync => with_cuda_switch(be, CudaBackend::set_mma_sync_attention, f),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (be, kernels);
        f()
    }
}

/// Whether attention has a v4 (wgmma) path on this backend: the CUDA backend with sm_90a images.
pub fn has_flash_v4(be: &dyn Backend) -> bool {
    #[cfg(feature = "cuda")]
    {
        be.as_any().downcast_ref::<crate::backend::cuda::CudaBackend>().is_some_and(|c| c.has_gemm_v3())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = be;
        false
    }
}

/// Host inputs of a case: random, already rounded to what the device stores.
fn make_inputs(case: &Case, seed: u64, act_dtype: DType) -> Result<Vec<Tensor>> {
    case.inputs
        .iter()
        .enumerate()
        .map(|(i, inp)| {
            let (shape, scale, mean, dtype) = match inp {
                Input::Act(s, scale) => (s, *scale, 0.0, act_dtype),
                Input::Table(s, mean, scale) => (s, *scale, *mean, DType::F32),
            };
            let n: usize = shape.iter().product();
            let mut values: Vec<f32> = crate::rng::normal_vec(seed, &format!("{}:{}:{i}", case.op, case.shape), n)
                .iter()
                .map(|x| mean + scale * x)
                .collect();
            round_through(&mut values, dtype);
            Tensor::from_f32(values, shape)
        })
        .collect()
}

/// The ids `take_nonfinite` returns (−1 for none) after recording `values` with one element made
/// NaN or ±inf in turn, in each activation dtype; the same on every backend.
fn nonfinite_probe(be: &dyn Backend, values: &[f32]) -> Result<Tensor> {
    let n = values.len();
    let with = |bad: Option<(usize, f32)>| {
        let mut v = values.to_vec();
        if let Some((i, x)) = bad {
            v[i] = x;
        }
        Tensor::from_f32(v, &[n])
    };
    let mut taken = Vec::new();
    let mut take = |be: &dyn Backend| -> Result<()> {
        taken.push(be.take_nonfinite()?.map_or(-1.0, |id| id as f32));
        Ok(())
    };
    let probes = [Some((n - 1, f32::NAN)), Some((n / 2, f32::INFINITY)), Some((0, f32::NEG_INFINITY)), None];
    for (i, bad) in probes.into_iter().enumerate() {
        for dtype in [DType::BF16, DType::F32] {
            be.record_nonfinite(&be.upload(&with(bad)?, dtype)?, 100 + i as u32)?;
            take(be)?;
        }
    }
    // The smallest id of several records survives; a clean tensor records nothing.
    for id in [7, 3, 5] {
        be.record_nonfinite(&be.upload(&with(Some((n - 1, f32::NAN)))?, DType::BF16)?, id)?;
    }
    be.record_nonfinite(&be.upload(&with(None)?, DType::BF16)?, 1)?;
    take(be)?;
    // A strided view: the NaN sits in a column the view leaves out.
    if n > 1 {
        let grid = be.upload(
            &with(Some((0, f32::NAN)))?.narrow(0, 0, n - n % 2)?.reshape(&[(n - n % 2) / 2, 2])?,
            DType::BF16,
        )?;
        be.record_nonfinite(&grid.narrow(1, 1, 1)?, 9)?;
        take(be)?;
        be.record_nonfinite(&grid.narrow(1, 0, 1)?, 9)?;
        take(be)?;
    }
    let count = taken.len();
    be.upload(&Tensor::from_f32(taken, &[count])?, DType::F32)
}

fn upload(be: &dyn Backend, inputs: &[Tensor], case: &Case) -> Result<Vec<Tensor>> {
    inputs
        .iter()
        .zip(&case.inputs)
        .map(|(t, spec)| {
            be.upload(t, if matches!(spec, Input::Table(..)) { DType::F32 } else { be.activation_dtype() })
        })
        .collect()
}

/// Run one case on `be` and on the CPU reference; time `reps` runs on `be` after a warm-up (none
/// when `reps` is 0).
pub fn check_case(be: &dyn Backend, case: &Case, seed: u64, reps: usize) -> Outcome {
    check(be, case, seed, reps, false)
}

fn check(be: &dyn Backend, case: &Case, seed: u64, reps: usize, keep_output: bool) -> Outcome {
    let mut outcome = Outcome {
        op: case.op.into(),
        shape: case.shape.clone(),
        rel_l2: f64::NAN,
        max_abs: f64::NAN,
        tolerance: (case.ulps * be.activation_dtype().unit_roundoff()).max(1e-6) as f64,
        nan: 0,
        passed: false,
        micros: f64::NAN,
        error: None,
        output: None,
    };
    let result = (|| -> Result<(Vec<f32>, Vec<f32>, f64)> {
        let host = make_inputs(case, seed, be.activation_dtype())?;
        let reference = (case.run)(&CpuBackend::new(), &host)?.to_vec_f32()?;
        let dev_inputs = upload(be, &host, case)?;
        let out_tensor = (case.run)(be, &dev_inputs)?;
        let out = out_tensor.to_vec_f32()?;
        if keep_output {
            outcome.output = Some((out.clone(), out_tensor.shape().to_vec()));
        }
        if !case.timed || reps == 0 {
            return Ok((out, reference, f64::NAN));
        }
        be.synchronize()?;
        let start = Instant::now();
        for _ in 0..reps {
            let _ = (case.run)(be, &dev_inputs)?;
        }
        be.synchronize()?;
        Ok((out, reference, start.elapsed().as_secs_f64() * 1e6 / reps.max(1) as f64))
    })();
    match result {
        Ok((out, reference, micros)) => {
            outcome.micros = micros;
            if out.len() != reference.len() {
                outcome.error = Some(format!("{} outputs, reference has {}", out.len(), reference.len()));
                return outcome;
            }
            outcome.nan = out.iter().filter(|v| !v.is_finite()).count();
            let (mut num, mut den, mut max_abs) = (0f64, 0f64, 0f64);
            for (o, r) in out.iter().zip(&reference) {
                let d = (*o as f64 - *r as f64).abs();
                num += d * d;
                den += (*r as f64) * (*r as f64);
                max_abs = max_abs.max(d);
            }
            outcome.rel_l2 = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
            outcome.max_abs = max_abs;
            outcome.passed = outcome.nan == 0 && outcome.rel_l2 <= outcome.tolerance;
        }
        Err(e) => outcome.error = Some(e.to_string()),
    }
    outcome
}

/// Run the cases whose op name contains `filter` (all when empty), of the suite `be` calls for
/// ([`Suite::for_backend`]). Under the emulator nothing is timed: its times mean nothing, and
/// the timed runs would double its time.
pub fn run(be: &dyn Backend, filter: &str, reps: usize) -> Vec<Outcome> {
    let reps = if is_emulated(be) { 0 } else { reps };
    run_suite(be, Suite::for_backend(be), filter, reps)
}

/// Run the cases of `suite` whose op name contains `filter` (all when empty); `reps` 0 times none.
pub fn run_suite(be: &dyn Backend, suite: Suite, filter: &str, reps: usize) -> Vec<Outcome> {
    run_cases(be, suite, filter, reps, false)
}

/// [`run_suite`], keeping each case's output in [`Outcome::output`]. The inputs depend only on
/// the case and the seed, so two backends' outputs can be compared case by case.
pub fn run_suite_keeping_outputs(be: &dyn Backend, suite: Suite, filter: &str) -> Vec<Outcome> {
    run_cases(be, suite, filter, 0, true)
}

fn run_cases(be: &dyn Backend, suite: Suite, filter: &str, reps: usize, keep: bool) -> Vec<Outcome> {
    cases(suite)
        .iter()
        .filter(|c| filter.is_empty() || c.op.contains(filter))
        .map(|c| check(be, c, 42, reps, keep))
        .collect()
}

/// The tensor name of case `index` in a selftest dump.
pub fn dump_name(index: usize, o: &Outcome) -> String {
    format!("{index:03} {} {}", o.op, o.shape)
}

pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = format!(
        "{:<20} {:<40} {:>10} {:>10} {:>9} {:>10}  result\n",
        "op", "shape", "rel_l2", "max_abs", "tol", "time_us"
    );
    for o in outcomes {
        let result = match (&o.error, o.passed) {
            (Some(e), _) => format!("ERROR {e}"),
            (None, true) => "ok".into(),
            (None, false) if o.nan > 0 => format!("FAIL ({} non-finite)", o.nan),
            (None, false) => "FAIL".into(),
        };
        let time = if o.micros.is_nan() { "-".to_string() } else { format!("{:.1}", o.micros) };
        s.push_str(&format!(
            "{:<20} {:<40} {:>10.2e} {:>10.2e} {:>9.1e} {time:>10}  {result}\n",
            o.op, o.shape, o.rel_l2, o.max_abs, o.tolerance
        ));
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    s.push_str(&format!("{} cases, {} passed, {failed} failed\n", outcomes.len(), outcomes.len() - failed));
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn ops(suite: Suite) -> BTreeSet<&'static str> {
        cases(suite).iter().map(|c| c.op).collect()
    }

    #[test]
    fn the_small_suite_checks_the_same_ops_as_the_full_suite() {
        let (full, small) = (ops(Suite::Full), ops(Suite::Small));
        assert_eq!(
            small,
            full,
            "only in full: {:?}; only in small: {:?}",
            full.difference(&small).collect::<Vec<_>>(),
            small.difference(&full).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_small_suite_stays_small() {
        for c in cases(Suite::Small) {
            for input in &c.inputs {
                let (Input::Act(shape, _) | Input::Table(shape, ..)) = input;
                let n: usize = shape.iter().product();
                assert!(n <= 128 << 10, "{} {}: an input of {shape:?} is too large for the emulator", c.op, c.shape);
            }
        }
    }

    #[test]
    fn every_small_case_runs_on_the_cpu() {
        let outcomes = run_suite(&CpuBackend::new(), Suite::Small, "", 0);
        assert_eq!(outcomes.len(), cases(Suite::Small).len());
        let failed: Vec<_> = outcomes.iter().filter(|o| !o.passed).map(|o| format!("{o:?}")).collect();
        assert!(failed.is_empty(), "{failed:#?}");
    }
}
