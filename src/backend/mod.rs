//! The op layer. Model code is written once against [`Backend`]; the CPU backend is the f32
//! reference, and every other backend is checked op by op against it.
//!
//! Layout conventions shared by all backends:
//! - activations are row-major with channels (or head dim) last, except image tensors, which are
//!   NCHW like the PyTorch reference;
//! - linear weights use PyTorch's `[out, in]` layout: `linear(x, w) = x · wᵀ`;
//! - attention takes `q [B, Nq, H, D]`, `k, v [B, Nk, Hkv, D]` (H a multiple of Hkv, query head
//!   `h` reads kv head `h / (H / Hkv)`) and returns `[B, Nq, H, D]`;
//! - per-sample modulation vectors (`shift`, `scale`, `gate`) are `[B, C]` and broadcast over tokens.
//!
//! Ops accept strided views; a backend copies to dense memory where its kernels need it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod nan_check;
pub mod scope;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{DeviceKind, Tensor};

/// Which keys a query may attend to.
#[derive(Debug, Clone, PartialEq)]
pub enum AttnMask {
    /// Full bidirectional attention.
    None,
    /// Key `j` is visible to query `i` iff `j <= i` and `j < valid_len[b]` (causal ∧ right padding,
    /// the Qwen3 text-encoder mask). `valid_len = None` means no padding.
    Causal { valid_len: Option<Vec<usize>> },
}

/// A weight-only quantized `[rows, cols]` linear weight as a backend holds it: the CPU reference
/// keeps the dequantized f32 values (`scales` None); the GPU keeps the codes and scales and
/// dequantizes inside its GEMM.
#[derive(Debug, Clone)]
pub struct QuantTensor {
    pub format: crate::quant::QuantFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: Tensor,
    pub scales: Option<Tensor>,
}

/// Zero padding of a 2-D convolution input, in pixels: (top, bottom, left, right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding2d {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding2d {
    pub const fn same(p: usize) -> Padding2d {
        Padding2d { top: p, bottom: p, left: p, right: p }
    }
}

/// Which elements RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairs {
    /// `(x[2m], x[2m+1])`: the FLUX DiT.
    Interleaved,
    /// `(x[m], x[m + D/2])`: Qwen's rotate-half.
    Halves,
}

/// Work recorded by [`Backend::capture`].
pub trait Captured {
    /// Write `inputs` (the recorded shapes and dtypes) into the recording's input buffers, queue
    /// the recorded work, and return its output as a tensor of its own.
    fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor>;
}

pub trait Backend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> DeviceKind;

    /// For backend-specific controls (e.g. the CUDA backend's memory statistics).
    fn as_any(&self) -> &dyn std::any::Any;

    /// Human-readable device name, e.g. "cpu (2 threads)" or "NVIDIA H100 80GB HBM3".
    fn name(&self) -> String;

    /// The dtype this backend stores activations in (f32 on the CPU reference, bf16 on CUDA).
    fn activation_dtype(&self) -> DType;

    /// The dtype weights decoded on the host (quantized checkpoints) are stored in: the
    /// activation dtype, unless the backend keeps weights narrower than its activations.
    fn decoded_weight_dtype(&self) -> DType {
        self.activation_dtype()
    }

    /// Whether a checkpoint's scaled-FP8 linears are kept as their codes and scales (a weight-only
    /// FP8 `QuantTensor`, dequantized inside the GEMM) instead of decoded to
    /// `decoded_weight_dtype` at load: half the memory, the same values. The CPU in bf16 precision
    /// does; the GPU decodes them until its weight-only FP8 GEMM is measured against its bf16 one.
    fn keeps_fp8_codes(&self) -> bool {
        false
    }

    // ---- memory and layout -------------------------------------------------------------------

    /// Bring a host tensor onto this backend, stored as `dtype` (the CPU keeps f32 storage but
    /// rounds the values through `dtype`, so it computes with exactly what a device would hold).
    fn upload(&self, host: &Tensor, dtype: DType) -> Result<Tensor>;

    /// A weight from raw little-endian bytes of `dtype` (e.g. a memory-mapped safetensors slice).
    fn load_weight(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor>;

    /// Dense row-major copy of a (possibly strided) view.
    fn contiguous(&self, x: &Tensor) -> Result<Tensor>;

    /// Concatenate along `dim`; all other dims must agree.
    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor>;

    /// Wait for all queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Record `work` once for replays with new input values (CUDA graphs). `work` runs once, on
    /// copies of `inputs` that the recording owns, and returns a tensor of `output`'s shape and
    /// dtype; it must not allocate memory that outlives it (run it once eagerly first, so
    /// workspaces and cached tables exist). None: this backend does not record; run `work`'s
    /// computation directly instead.
    fn capture(
        &self,
        _inputs: &[&Tensor],
        _output: (&[usize], DType),
        _work: &mut dyn FnMut(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Option<Box<dyn Captured>>> {
        Ok(None)
    }

    // ---- dense algebra -------------------------------------------------------------------------

    /// `y = x · wᵀ (+ bias)`, x `[.., K]`, w `[N, K]`, bias `[N]` -> `[.., N]`.
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;

    /// Upload a quantized weight.
    fn load_quantized(&self, q: &crate::quant::Quantized) -> Result<QuantTensor>;

    /// `y = x · dequant(w)ᵀ (+ bias)`: dequantized on the fly, f32 accumulation.
    fn linear_quantized(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor>;

    /// FP8 W8A8 linear: `w` in the fp8 format (per-channel scales); activations rounded to e4m3
    /// per token (|x|max -> 448); f32 accumulation (see `cpu::quantized`).
    fn linear_fp8(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor>;

    /// `linear_fp8(layer_norm_modulate(x, shift, scale, eps), w, bias)`: adaLN feeding an FP8
    /// linear. This composition is the reference; the CUDA backend quantizes the normalised
    /// activation in the norm's kernel, without writing it in bf16.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_modulate_linear_fp8(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        eps: f32,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.linear_fp8(&self.layer_norm_modulate(x, shift, scale, eps)?, w, bias)
    }

    /// `linear_fp8(swiglu_concat(prefix, x), w, bias)`, or `linear_fp8(swiglu(x), w, bias)` without
    /// a prefix: the feed-forward's activation feeding an FP8 linear. This composition is the
    /// reference; the CUDA backend quantizes the activation where SwiGLU makes it, without writing
    /// it in bf16.
    fn swiglu_linear_fp8(
        &self,
        prefix: Option<&Tensor>,
        x: &Tensor,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.linear_fp8(&swiglu_beside(self, prefix, x)?, w, bias)
    }

    /// `x + gate · linear_fp8(a, w, bias)`: the DiT's gated residual of an FP8 linear, a `[B, L, K]`,
    /// x `[B, L, N]`, gate `[B, N]`. This composition is the reference; the CUDA backend fuses the
    /// residual into the FP8 GEMM's epilogue, as `linear_gated_add` does for bf16.
    fn linear_fp8_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        a: &Tensor,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.gated_add(x, gate, &self.linear_fp8(a, w, bias)?)
    }

    /// `x + gate · swiglu_linear_fp8(prefix, a, w, None)`: a feed-forward's (or single block's)
    /// output projection in FP8 with its gated residual. This composition is the reference; the
    /// CUDA backend quantizes the activation where SwiGLU makes it and adds the residual in the
    /// GEMM's epilogue.
    fn swiglu_linear_fp8_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        prefix: Option<&Tensor>,
        a: &Tensor,
        w: &QuantTensor,
    ) -> Result<Tensor> {
        self.gated_add(x, gate, &self.swiglu_linear_fp8(prefix, a, w, None)?)
    }

    /// SageAttention-style attention: smoothed K, int8 Q/K with per-64-token block scales, fp8 P
    /// and per-channel fp8 V, f32 accumulation (see `cpu::quantized`).
    fn attention_sage(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor>;

    /// `attention_sage` (no mask) of q and k that still need their QK norm: each is the
    /// concatenation over tokens of its `parts`, every part `rms_norm_rope`d with its own weight
    /// and the table rows of its tokens (`rope`'s rows 0.. cover the joint sequence). This
    /// composition is the reference; the CUDA backend quantizes q and k in the kernels that norm
    /// and rotate them, without writing them in bf16.
    fn attention_sage_normed(
        &self,
        q: &[QkPart],
        k: &[QkPart],
        rope: &QkRope,
        v: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        attention_sage_normed_composed(self, q, k, rope, v, scale)
    }

    /// The double block's attention and output projections in FP8: `attention_sage_normed(q, k,
    /// rope, v, scale)` as `[B, N, H·D]`, the first `outs[0].x.dim(1)` tokens of each sample
    /// through `outs[0]` (`linear_fp8_gated_add`, no bias), the rest through `outs[1]`. This
    /// composition is the reference; the CUDA backend writes the attention output's e4m3 codes and
    /// per-token scales in the attention kernel, without a quantize pass.
    fn attention_sage_normed_linear_fp8_gated_add(
        &self,
        q: &[QkPart],
        k: &[QkPart],
        rope: &QkRope,
        v: &Tensor,
        scale: f32,
        outs: [GatedFp8; 2],
    ) -> Result<[Tensor; 2]> {
        attention_sage_normed_linear_fp8_composed(self, q, k, rope, v, scale, outs)
    }

    /// `attention_sage_normed_linear_fp8_gated_add` with exact attention of normed q and k (no
    /// mask): the double block's attention and FP8 output projections with `--attention exact`.
    /// This composition is the reference; the CUDA backend writes the e4m3 rows in flash
    /// attention's kernel.
    fn attention_linear_fp8_gated_add(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        outs: [GatedFp8; 2],
    ) -> Result<[Tensor; 2]> {
        attention_linear_fp8_composed(self, q, k, v, scale, outs)
    }

    /// Scaled dot-product attention with softmax in f32 (layouts in the module docs).
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor>;

    /// 2-D convolution (cross-correlation) of NCHW `x` with `w [Cout, Cin, kh, kw]`.
    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: Padding2d,
    ) -> Result<Tensor>;

    // ---- normalisation -------------------------------------------------------------------------

    /// LayerNorm over the last dim, no affine.
    fn layer_norm(&self, x: &Tensor, eps: f32) -> Result<Tensor>;

    /// adaLN: `LayerNorm(x) * (1 + scale) + shift`, x `[B, L, C]`, shift/scale `[B, C]`.
    /// Fused on GPUs; the CPU reference composes `layer_norm` and `modulate`.
    fn layer_norm_modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
        let n = self.layer_norm(x, eps)?;
        self.modulate(&n, shift, scale)
    }

    /// `x * (1 + scale) + shift`, x `[B, L, C]`, shift/scale `[B, C]`.
    fn modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor>;

    /// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * weight`.
    fn rms_norm(&self, x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor>;

    /// GroupNorm of NCHW `x` with per-channel affine, optionally followed by SiLU.
    fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        weight: &Tensor,
        bias: &Tensor,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor>;

    // ---- element-wise --------------------------------------------------------------------------

    fn silu(&self, x: &Tensor) -> Result<Tensor>;

    /// `silu(x[.., :M]) * x[.., M:]` for x `[.., 2M]` -> `[.., M]` (the gate is the first half).
    fn swiglu(&self, x: &Tensor) -> Result<Tensor>;

    /// `a·x + b·y`, same shapes. Residual adds, the Euler step and CFG are all this op.
    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor>;

    /// `concat([prefix, swiglu(x)], last dim)`: the single block's attention output beside its MLP
    /// activation, x a (possibly strided) `[.., 2M]` view. This composition is the reference; the
    /// CUDA backend writes the activation straight into the concatenation.
    fn swiglu_concat(&self, prefix: &Tensor, x: &Tensor) -> Result<Tensor> {
        let act = self.swiglu(x)?;
        self.concat(&[prefix, &act], prefix.rank().saturating_sub(1))
    }

    /// Gated residual `x + gate * y`, x/y `[B, L, C]`, gate `[B, C]`.
    fn gated_add(&self, x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor>;

    /// The gated residual of a linear: `x + gate * linear(a, w, bias)`, a `[B, L, K]`, x `[B, L, N]`.
    /// This composition is the reference; the CUDA backend fuses it into the GEMM's epilogue.
    fn linear_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        a: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.gated_add(x, gate, &self.linear(a, w, bias)?)
    }

    /// Per-channel affine of NCHW `x`: `x * mul[c] + add[c]` (the latent BatchNorm and its inverse).
    fn channel_affine(&self, x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<Tensor>;

    /// Nearest-neighbour ×2 upsampling of NCHW `x`.
    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor>;

    // ---- position and embedding ----------------------------------------------------------------

    /// RoPE on interleaved pairs `(x[2m], x[2m+1])` (the FLUX DiT), x `[B, N, H, D]`,
    /// cos/sin `[N, D/2]` (one angle per pair).
    fn rope_interleaved(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;

    /// RoPE on halves `(x[m], x[m + D/2])` (Qwen's rotate-half), same shapes as above.
    fn rope_half(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;

    /// The q/k path of attention in one op: `rms_norm` over the head dim (optional weight), then
    /// RoPE on `pairs`, x `[B, N, H, D]` (a strided view such as a slice of a fused projection
    /// is fine), cos/sin `[N, D/2]`. This composition is the reference; the CUDA backend fuses it.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_rope(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        eps: f32,
        cos: &Tensor,
        sin: &Tensor,
        pairs: RopePairs,
    ) -> Result<Tensor> {
        let n = self.rms_norm(x, weight, eps)?;
        match pairs {
            RopePairs::Interleaved => self.rope_interleaved(&n, cos, sin),
            RopePairs::Halves => self.rope_half(&n, cos, sin),
        }
    }

    /// Sinusoidal embedding `[cos(t·f), sin(t·f)]`, `f_j = max_period^(-j / (dim/2))`,
    /// one row per timestep of `t` (f32 `[B]` on this backend: a recorded step reads new values
    /// from it) -> `[B, dim]` (diffusers `flip_sin_to_cos=True, shift=0`).
    fn timestep_embedding(&self, t: &Tensor, dim: usize, max_period: f32) -> Result<Tensor>;

    /// Rows of `table [V, C]` picked by `ids` -> `[ids.len(), C]`.
    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor>;

    // ---- numerical health ----------------------------------------------------------------------

    /// If any element of `x` is NaN or ±inf, record `check` in the backend's health word, which
    /// keeps the smallest id recorded. Queued like any op: no host synchronisation.
    fn record_nonfinite(&self, x: &Tensor, check: u32) -> Result<()>;

    /// The smallest check id recorded since the last call (None: every checked tensor was
    /// finite), and clear the word. Waits for queued work.
    fn take_nonfinite(&self) -> Result<Option<u32>>;
}

/// One piece of q or k for `attention_sage_normed`: the raw projection `x` `[B, L, H, D]` (a
/// strided view is fine) and its RMSNorm weight `[D]`.
#[derive(Clone, Copy)]
pub struct QkPart<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
}

/// The QK norm's epsilon and the RoPE tables `[N, D/2]` of the joint sequence.
#[derive(Clone, Copy)]
pub struct QkRope<'a> {
    pub eps: f32,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub pairs: RopePairs,
}

/// The parts `rms_norm_rope`d (part i with the table rows of its tokens) and concatenated.
pub fn norm_rope_parts<B: Backend + ?Sized>(be: &B, parts: &[QkPart], rope: &QkRope) -> Result<Tensor> {
    let mut start = 0;
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let l = p.x.shape().get(1).copied().unwrap_or(0);
        let (cos, sin) = (rope.cos.narrow(0, start, l)?, rope.sin.narrow(0, start, l)?);
        out.push(be.rms_norm_rope(p.x, Some(p.weight), rope.eps, &cos, &sin, rope.pairs)?);
        start += l;
    }
    match out.len() {
        0 => Err(Error::shape("attention_sage_normed", "q and k need at least one part each")),
        1 => Ok(out.pop().expect("one part")),
        _ => be.concat(&out.iter().collect::<Vec<_>>(), 1),
    }
}

/// `attention_sage_normed`'s composition: the reference, and the fallbacks of fused versions.
pub fn attention_sage_normed_composed<B: Backend + ?Sized>(
    be: &B,
    q: &[QkPart],
    k: &[QkPart],
    rope: &QkRope,
    v: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (q, k) = (norm_rope_parts(be, q, rope)?, norm_rope_parts(be, k, rope)?);
    be.attention_sage(&q, &k, v, &AttnMask::None, scale)
}

/// One FP8 output projection with its gated residual, `x + gate · linear_fp8(a, w)` (x `[B, L, N]`,
/// gate `[B, N]`), whose activation `a` another op makes.
#[derive(Clone, Copy)]
pub struct GatedFp8<'a> {
    pub x: &'a Tensor,
    pub gate: &'a Tensor,
    pub w: &'a QuantTensor,
}

/// `attention_sage_normed_linear_fp8_gated_add`'s composition: the reference, and the fallback of
/// the fused version.
pub fn attention_sage_normed_linear_fp8_composed<B: Backend + ?Sized>(
    be: &B,
    q: &[QkPart],
    k: &[QkPart],
    rope: &QkRope,
    v: &Tensor,
    scale: f32,
    outs: [GatedFp8; 2],
) -> Result<[Tensor; 2]> {
    fp8_projections_of(be, &be.attention_sage_normed(q, k, rope, v, scale)?, outs)
}

/// `attention_linear_fp8_gated_add`'s composition: the reference, and the fallback of the fused
/// version.
pub fn attention_linear_fp8_composed<B: Backend + ?Sized>(
    be: &B,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    outs: [GatedFp8; 2],
) -> Result<[Tensor; 2]> {
    fp8_projections_of(be, &be.attention(q, k, v, &AttnMask::None, scale)?, outs)
}

/// An attention output `o` `[B, N, H, D]` as `[B, N, H·D]`, its first `outs[0].x.dim(1)` tokens of
/// each sample through `outs[0]` (`linear_fp8_gated_add`), the rest through `outs[1]`.
fn fp8_projections_of<B: Backend + ?Sized>(be: &B, o: &Tensor, outs: [GatedFp8; 2]) -> Result<[Tensor; 2]> {
    check::rank("attention_linear_fp8_gated_add", o, 4)?;
    let (b, n) = (o.dim(0), o.dim(1));
    let split = check::token_split(outs[0].x, outs[1].x, b, n)?;
    let o = o.reshape(&[b, n, o.dim(2) * o.dim(3)])?;
    let parts = [o.narrow(1, 0, split)?, o.narrow(1, split, n - split)?];
    let [first, second] = outs;
    Ok([
        be.linear_fp8_gated_add(first.x, first.gate, &parts[0], first.w, None)?,
        be.linear_fp8_gated_add(second.x, second.gate, &parts[1], second.w, None)?,
    ])
}

/// `[prefix | swiglu(x)]` (`swiglu_concat`), or `swiglu(x)` without a prefix: the activation a
/// feed-forward's output projection reads (`swiglu_linear_fp8`'s composition and fallbacks).
pub fn swiglu_beside<B: Backend + ?Sized>(be: &B, prefix: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    match prefix {
        Some(p) => be.swiglu_concat(p, x),
        None => be.swiglu(x),
    }
}

/// Shape checks shared by every backend, so each reports bad shapes the same way.
pub mod check {
    use crate::dtype::DType;
    use crate::error::{Error, Result};
    use crate::tensor::Tensor;

    pub fn rank(op: &'static str, x: &Tensor, rank: usize) -> Result<()> {
        if x.rank() != rank {
            return Err(Error::shape(op, format!("expected a rank-{rank} tensor, got {:?}", x.shape())));
        }
        Ok(())
    }

    pub fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.shape() != b.shape() {
            return Err(Error::shape(op, format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape())));
        }
        Ok(())
    }

    /// The tokens of the first of two residuals `[B, L0, N0]`, `[B, L1, N1]` that split a sequence of
    /// `n` tokens per sample (`L0 + L1 = n`, both parts non-empty).
    pub fn token_split(first: &Tensor, second: &Tensor, b: usize, n: usize) -> Result<usize> {
        let fits = |x: &Tensor| x.rank() == 3 && x.dim(0) == b && x.dim(1) > 0;
        if !fits(first) || !fits(second) || first.dim(1) + second.dim(1) != n {
            let what = format!("residuals {:?} and {:?} for {b} samples of {n} tokens", first.shape(), second.shape());
            return Err(Error::shape("attention_linear_fp8_gated_add", what));
        }
        Ok(first.dim(1))
    }

    /// `v` must be `[B, C]` for x `[B, L, C]`.
    pub fn per_sample(op: &'static str, x: &Tensor, v: &Tensor) -> Result<()> {
        rank(op, x, 3)?;
        if v.shape() != [x.dim(0), x.dim(2)] {
            return Err(Error::shape(
                op,
                format!("modulation vector {:?} does not match x {:?} (expected [B, C])", v.shape(), x.shape()),
            ));
        }
        Ok(())
    }

    /// `timestep_embedding` needs f32 timesteps `[B]` and at least one (cos, sin) pair.
    pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<()> {
        if t.rank() != 1 || t.dtype() != DType::F32 {
            return Err(Error::shape(
                "timestep_embedding",
                format!("timesteps must be f32 [B], got {:?} {}", t.shape(), t.dtype()),
            ));
        }
        if dim < 2 {
            return Err(Error::shape("timestep_embedding", format!("dim {dim} is too small")));
        }
        Ok(())
    }

    /// Returns (M, K, N) for `linear`.
    pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize)> {
        rank("linear", w, 2)?;
        linear_dims("linear", x, [w.dim(0), w.dim(1)], bias)
    }

    /// Returns (M, K, N) for `linear_quantized` and `linear_fp8`.
    pub fn linear_quantized(
        op: &'static str,
        x: &Tensor,
        w: &super::QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<(usize, usize, usize)> {
        linear_dims(op, x, [w.rows, w.cols], bias)
    }

    /// Returns (M, K, N) for `linear_fp8`, whose weight must hold fp8 codes.
    pub fn linear_fp8(x: &Tensor, w: &super::QuantTensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize)> {
        if w.format != crate::quant::QuantFormat::Fp8 {
            return Err(Error::shape("linear_fp8", format!("weight is {:?}, not fp8", w.format)));
        }
        linear_quantized("linear_fp8", x, w, bias)
    }

    /// x `[.., K]` against a `[N, K]` weight and an optional `[N]` bias.
    fn linear_dims(
        op: &'static str,
        x: &Tensor,
        [n, k]: [usize; 2],
        bias: Option<&Tensor>,
    ) -> Result<(usize, usize, usize)> {
        if x.rank() == 0 || x.last_dim() != k {
            return Err(Error::shape(
                op,
                format!("input {:?} does not match weight [{n}, {k}] ([out, in])", x.shape()),
            ));
        }
        if let Some(b) = bias {
            if b.shape() != [n] {
                return Err(Error::shape(op, format!("bias {:?} for weight [{n}, {k}]", b.shape())));
            }
        }
        Ok((x.rows(), k, n))
    }

    /// Returns (B, Nq, H, Nk, Hkv, D) for `attention`.
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &super::AttnMask) -> Result<[usize; 6]> {
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            if t.rank() != 4 {
                return Err(Error::shape("attention", format!("{name} must be [B, N, H, D], got {:?}", t.shape())));
            }
        }
        let [b, nq, h, d] = [q.dim(0), q.dim(1), q.dim(2), q.dim(3)];
        let [bk, nk, hkv, dk] = [k.dim(0), k.dim(1), k.dim(2), k.dim(3)];
        if k.shape() != v.shape() || bk != b || dk != d || hkv == 0 || h % hkv != 0 {
            return Err(Error::shape(
                "attention",
                format!("incompatible q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()),
            ));
        }
        if let super::AttnMask::Causal { valid_len: Some(lens) } = mask {
            if lens.len() != b || lens.iter().any(|&l| l > nk) {
                return Err(Error::shape("attention", format!("padding lengths {lens:?} for batch {b} and {nk} keys")));
            }
        }
        Ok([b, nq, h, nk, hkv, d])
    }

    /// `group_norm`: x NCHW, channels divisible by `groups`, per-channel weight and bias.
    pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor) -> Result<()> {
        rank("group_norm", x, 4)?;
        let c = x.dim(1);
        if groups == 0 || !c.is_multiple_of(groups) || weight.shape() != [c] || bias.shape() != [c] {
            return Err(Error::shape(
                "group_norm",
                format!("{groups} groups, weight {:?}, bias {:?} for x {:?}", weight.shape(), bias.shape(), x.shape()),
            ));
        }
        Ok(())
    }

    pub fn rms_weight(x: &Tensor, weight: Option<&Tensor>) -> Result<()> {
        match weight {
            Some(w) if w.shape() != [x.last_dim()] => {
                Err(Error::shape("rms_norm", format!("weight {:?} for x {:?}", w.shape(), x.shape())))
            }
            _ => Ok(()),
        }
    }

    pub fn channel_affine(x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<()> {
        rank("channel_affine", x, 4)?;
        let c = x.dim(1);
        if mul.shape() != [c] || add.shape() != [c] {
            return Err(Error::shape(
                "channel_affine",
                format!("mul {:?} / add {:?} for x {:?}", mul.shape(), add.shape(), x.shape()),
            ));
        }
        Ok(())
    }

    /// The output width of `swiglu` (half the even last dim).
    pub fn swiglu(x: &Tensor) -> Result<usize> {
        if !x.last_dim().is_multiple_of(2) {
            return Err(Error::shape("swiglu", format!("last dim of {:?} must be even", x.shape())));
        }
        Ok(x.last_dim() / 2)
    }

    pub fn embedding(ids: &[u32], table: &Tensor) -> Result<()> {
        rank("embedding", table, 2)?;
        let vocab = table.dim(0);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::shape("embedding", format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        Ok(())
    }

    /// Output shape of `concat`.
    pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Vec<usize>> {
        let first = xs.first().ok_or_else(|| Error::shape("concat", "nothing to concatenate"))?;
        let rank = first.rank();
        if dim >= rank {
            return Err(Error::shape("concat", format!("dim {dim} out of range for {:?}", first.shape())));
        }
        for x in xs {
            let same = x.rank() == rank && (0..rank).all(|d| d == dim || x.dim(d) == first.dim(d));
            if !same || x.dtype() != first.dtype() {
                return Err(Error::shape(
                    "concat",
                    format!("{:?} and {:?} differ outside dim {dim}", first.shape(), x.shape()),
                ));
            }
        }
        let mut shape = first.shape().to_vec();
        shape[dim] = xs.iter().map(|x| x.dim(dim)).sum();
        Ok(shape)
    }

    /// Output (height, width) of `conv2d`.
    pub fn conv2d(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: super::Padding2d,
    ) -> Result<(usize, usize)> {
        rank("conv2d", x, 4)?;
        rank("conv2d", w, 4)?;
        let (hp, wp) = (x.dim(2) + pad.top + pad.bottom, x.dim(3) + pad.left + pad.right);
        if w.dim(1) != x.dim(1) || stride == 0 || hp < w.dim(2) || wp < w.dim(3) {
            return Err(Error::shape(
                "conv2d",
                format!("input {:?} with weight {:?}, stride {stride}, {pad:?}", x.shape(), w.shape()),
            ));
        }
        if let Some(b) = bias {
            if b.shape() != [w.dim(0)] {
                return Err(Error::shape("conv2d", format!("bias {:?} for {} output channels", b.shape(), w.dim(0))));
            }
        }
        Ok(((hp - w.dim(2)) / stride + 1, (wp - w.dim(3)) / stride + 1))
    }

    /// x `[B, N, H, D]`, cos/sin `[N, D/2]`.
    pub fn rope(op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
        rank(op, x, 4)?;
        let (n, d) = (x.dim(1), x.dim(3));
        if d % 2 != 0 || cos.shape() != [n, d / 2] || sin.shape() != [n, d / 2] {
            return Err(Error::shape(
                op,
                format!("x {:?} needs cos/sin [{n}, {}], got {:?} / {:?}", x.shape(), d / 2, cos.shape(), sin.shape()),
            ));
        }
        Ok(())
    }
}
