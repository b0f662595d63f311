//! Launchers for Sage attention (SageAttention-style 8-bit attention, the CPU emulation's
//! numerics). Head dims 64 and 128 run v2 on tensor cores (kernels/attention_sage_mma.cu: int8
//! Q·Kᵀ, P·V on e4m3 mma where the image has it, on bf16 mma with the same products elsewhere);
//! other head dims, and the reference, the row-wise kernel (kernels/quantized.cu). The pre-passes:
//! K/V statistics (means, V's per-channel |v − mean|max), Q and K to int8 codes with per-64-token
//! block scales, V to transposed e4m3. `attention_sage_normed` makes Q's and K's codes in the
//! kernel that applies their QK RMSNorm + RoPE (v3 of the pre-pass). On sm_90a images unmasked
//! heads of 128 run the attention's v3 on wgmma (sage_wgmma.rs) from the same pre-pass outputs.

use cudarc::driver::LaunchConfig;

use super::e4m3_rows::E4m3Rows;
use super::quantized::has_fp8_mma;
use super::sage_wgmma::{self, SageArgs};
use super::{launch, CudaBackend, CudaStorage};
use crate::backend::{attention_sage_normed_composed, check, AttnMask, QkPart, QkRope, RopePairs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Tokens per block of the Sage K/V statistics (`SAGE_STATS_TOKENS` in kernels/quantized.cu).
const SAGE_STATS_TOKENS: usize = 256;

/// Tokens per Q/K scale block (`SAGE_TILE`).
const SAGE_TILE: usize = 64;

/// Queries per block of attention_sage_mma: two Q scale blocks, 4 warps of 16 rows each.
const SAGE_MMA_BLOCK_Q: usize = 128;

/// Dynamic shared memory of attention_sage_mma: the int8 Q tile and two stages of int8 K and Vᵀ
/// tiles of 64 tokens (e4m3 codes, or bf16 values with `e4m3_pv` false), rows padded by 16 bytes.
pub(super) fn sage_mma_smem_bytes(d: usize, e4m3_pv: bool) -> usize {
    let v_row = if e4m3_pv { 64 } else { 128 } + 16;
    SAGE_MMA_BLOCK_Q * (d + 16) + 2 * (64 * (d + 16) + d * v_row)
}

/// The tensor-core Sage kernels whose shared memory exceeds the default 48 KB, with their need.
pub(super) fn sage_mma_big_smem() -> [(&'static str, usize); 3] {
    [
        ("attention_sage_mma_d128", sage_mma_smem_bytes(128, true)),
        ("attention_sage_mma_e4m3out_d128", sage_mma_smem_bytes(128, true)),
        ("attention_sage_mma_bf16pv_d128", sage_mma_smem_bytes(128, false)),
    ]
}

/// `[b, nq, h, nk, hkv, d]` of an attention call.
type Dims = [usize; 6];

/// Whether the tensor-core kernels (v2) run this call.
fn mma_applies(be: &CudaBackend, [b, nq, h, _, _, d]: Dims) -> bool {
    let reference = be.dev.reference_attention.load(std::sync::atomic::Ordering::Relaxed);
    (d == 64 || d == 128) && !reference && h <= 65535 && b <= 65535 && nq > 0
}

/// The K/V smoothing statistics per (batch, kv head, channel): K's and V's means over the tokens
/// and V's |v − mean|max. Both reductions accumulate atomically into the zeroed buffers: f64 K and
/// V sums (K's may come from the fused norm kernel), then the means and the maxima.
struct KvStats {
    sums: CudaStorage, // 2 doubles per (batch, kv head, channel): K's, then V's
    v_absmax: CudaStorage,
    k_mean: Tensor,
    v_mean: Tensor,
}

impl KvStats {
    fn new(be: &CudaBackend, [b, _, _, _, hkv, d]: Dims) -> Result<Self> {
        if b * hkv > 65535 {
            return Err(Error::shape("attention_sage", format!("{b} batch x {hkv} kv heads exceed one grid")));
        }
        let mut sums = be.alloc(DType::F32, 4 * b * hkv * d)?;
        let mut v_absmax = be.alloc(DType::F32, b * hkv * d)?;
        be.dev.stream.memset_zeros(&mut sums.buf).map_err(super::gpu_err)?;
        be.dev.stream.memset_zeros(&mut v_absmax.buf).map_err(super::gpu_err)?;
        let k_mean = be.output(DType::F32, &[b * hkv * d])?;
        let v_mean = be.output(DType::F32, &[b * hkv * d])?;
        Ok(KvStats { sums, v_absmax, k_mean, v_mean })
    }

    /// V's sums, and K's when `k` is not 0 (else they are in already), then the means and V's
    /// maxima; k and v `[b, nk, hkv, d]` with tokens `ld` elements apart.
    fn finish(&self, be: &CudaBackend, k: u64, (v, ld): (u64, i64), [b, _, _, nk, hkv, d]: Dims) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (nk.div_ceil(SAGE_STATS_TOKENS).max(1) as u32, (b * hkv) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nk32, hkv32, d32) = (nk as i32, hkv as i32, d as i32);
        let (sp, vap) = (self.sums.base_ptr(), self.v_absmax.base_ptr());
        let (kmp, vmp) = (be.ptr(&self.k_mean)?, be.ptr(&self.v_mean)?);
        launch!(be.dev, "sage_kv_sums_bf16", cfg, k, v, sp, nk32, hkv32, d32, ld)?;
        launch!(be.dev, "sage_kv_means_absmax_bf16", cfg, v, sp, kmp, vmp, vap, nk32, hkv32, d32, ld)
    }
}

/// Q's or K's int8 codes `[B, N, H, D]` and their per-(batch, head, 64-token block) |x − mean|max.
struct Codes {
    codes: Tensor,
    absmax: Tensor,
}

impl Codes {
    fn new(be: &CudaBackend, b: usize, n: usize, heads: usize, d: usize) -> Result<Self> {
        Ok(Codes {
            codes: be.output(DType::U8, &[b * n * heads * d])?,
            absmax: be.output(DType::F32, &[b * heads * n.div_ceil(SAGE_TILE)])?,
        })
    }
}

/// One (64-token block, batch · head) CTA of 256 threads each.
fn per_block(n: usize, bh: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(SAGE_TILE) as u32, bh as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

pub(super) fn attention_sage(
    be: &CudaBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f32,
) -> Result<Tensor> {
    let dims = check::attention(q, k, v, mask)?;
    let [b, nq, h, nk, hkv, d] = dims;
    if d > 256 {
        return Err(Error::shape("attention_sage", format!("head dim {d} is above 256")));
    }
    let (_q, qp) = be.bf16_arg(q, "attention_sage")?;
    let (_k, kp) = be.bf16_arg(k, "attention_sage")?;
    let (_v, vp) = be.bf16_arg(v, "attention_sage")?;
    let stats = KvStats::new(be, dims)?;
    let dense = (hkv * d) as i64;
    stats.finish(be, kp, (vp, dense), dims)?;
    let (qc, kc) = (Codes::new(be, b, nq, h, d)?, Codes::new(be, b, nk, hkv, d)?);
    let (qap, kap, kmp) = (be.ptr(&qc.absmax)?, be.ptr(&kc.absmax)?, be.ptr(&stats.k_mean)?);
    let (nq32, nk32, h32, hkv32, d32) = (nq as i32, nk as i32, h as i32, hkv as i32, d as i32);
    // v2 of the Q/K pre-pass reads each block with 16-byte loads: q and k must start 16-byte
    // aligned (views may not); v1 is its reference.
    let v1 = be.dev.sage_quantize_v1.load(std::sync::atomic::Ordering::Relaxed) || (qp | kp) % 16 != 0;
    let mma = mma_applies(be, dims);
    if !mma || v1 {
        // v1, stage 1: each 64-token block's |x - mean|max (the row-wise kernel's scales).
        launch!(be.dev, "sage_block_absmax_bf16", per_block(nq, b * h), qp, 0u64, qap, nq32, h32, d32)?;
        launch!(be.dev, "sage_block_absmax_bf16", per_block(nk, b * hkv), kp, kmp, kap, nk32, hkv32, d32)?;
    }
    if !mma {
        let out = be.output(DType::BF16, &[b, nq, h, d])?;
        let (causal, _lens, lp) = super::attention::mask_args(be, mask)?;
        let vmp = be.ptr(&stats.v_mean)?;
        let rows = b * nq * h;
        let cfg = super::warp_per_row(rows);
        let op = be.ptr(&out)?;
        let vap = stats.v_absmax.base_ptr();
        launch!(
            be.dev,
            "attention_sage_rowwise_bf16",
            cfg,
            qp,
            kp,
            vp,
            op,
            b as i32,
            nq32,
            nk32,
            h32,
            hkv32,
            d32,
            scale,
            causal,
            lp,
            qap,
            kap,
            kmp,
            vmp,
            vap
        )?;
        return Ok(out);
    }
    let (qcp, kcp) = (be.ptr(&qc.codes)?, be.ptr(&kc.codes)?);
    if v1 {
        // v1, stage 2: the codes, one element per thread.
        let (tq, tk) = (b * nq * h * d, b * nk * hkv * d);
        let grid = super::grid_1d;
        launch!(be.dev, "sage_quantize_int8_bf16", grid(tq), qp, 0u64, qap, qcp, nq32, h32, d32, tq as i64)?;
        launch!(be.dev, "sage_quantize_int8_bf16", grid(tk), kp, kmp, kap, kcp, nk32, hkv32, d32, tk as i64)?;
    } else {
        launch!(be.dev, "sage_quantize_int8_block_bf16", per_block(nq, b * h), qp, 0u64, qap, qcp, nq32, h32, d32)?;
        launch!(be.dev, "sage_quantize_int8_block_bf16", per_block(nk, b * hkv), kp, kmp, kap, kcp, nk32, hkv32, d32)?;
    }
    sage_mma(be, &qc, &kc, &stats, (vp, dense), dims, mask, scale, None)
}

/// Whether P·V runs on e4m3 tensor cores (else on bf16 ones with the same products): images with
/// e4m3 mma, unless `set_sage_bf16_pv` asks otherwise.
pub(super) fn e4m3_pv(be: &CudaBackend) -> bool {
    has_fp8_mma(be.dev.target) && !be.dev.sage_bf16_pv.load(std::sync::atomic::Ordering::Relaxed)
}

/// The tensor-core kernel (v2, or v3 where it applies) from Q's and K's codes: V (tokens `v_ld`
/// elements apart) to transposed e4m3 (codes for e4m3 mma, their bf16 values for bf16 mma), then
/// the attention; with `rows` (e4m3 P·V only), the kernels that also write the output's e4m3 rows.
#[allow(clippy::too_many_arguments)]
fn sage_mma(
    be: &CudaBackend,
    qc: &Codes,
    kc: &Codes,
    stats: &KvStats,
    (vp, v_ld): (u64, i64),
    dims: Dims,
    mask: &AttnMask,
    scale: f32,
    rows: Option<&E4m3Rows>,
) -> Result<Tensor> {
    let [b, nq, h, nk, hkv, d] = dims;
    let out = be.output(DType::BF16, &[b, nq, h, d])?;
    let (causal, _lens, lp) = super::attention::mask_args(be, mask)?;
    let e4m3_pv = e4m3_pv(be);
    if rows.is_some() && !e4m3_pv {
        return Err(Error::Gpu("the e4m3 output rows need e4m3 P·V".into()));
    }
    let nk_pad = nk.div_ceil(64) * 64;
    let vt = be.output(if e4m3_pv { DType::U8 } else { DType::BF16 }, &[b * hkv * d * nk_pad])?;
    let vtp = be.ptr(&vt)?;
    let (vmp, vap) = (be.ptr(&stats.v_mean)?, stats.v_absmax.base_ptr());
    let tv = b * hkv * d * nk_pad;
    let (d32, nq32, nk32) = (d as i32, nq as i32, nk as i32);
    launch!(
        be.dev,
        if e4m3_pv { "sage_quantize_vt_e4m3_bf16" } else { "sage_quantize_vt_e4m3_as_bf16" },
        super::grid_1d(tv),
        vp,
        vmp,
        vap,
        vtp,
        nk32,
        nk_pad as i32,
        hkv as i32,
        d32,
        v_ld,
        tv as i64
    )?;
    if sage_wgmma::applies(be, !matches!(mask, AttnMask::None), e4m3_pv, dims) {
        let args = SageArgs {
            q: be.ptr(&qc.codes)?,
            k: be.ptr(&kc.codes)?,
            vt: vtp,
            out: be.ptr(&out)?,
            q_absmax: be.ptr(&qc.absmax)?,
            k_absmax: be.ptr(&kc.absmax)?,
            v_mean: vmp,
            v_absmax: vap,
        };
        sage_wgmma::sage_v3(be, &args, dims, nk_pad, scale, rows)?;
        return Ok(out);
    }
    let cfg = LaunchConfig {
        grid_dim: E4m3Rows::grid(rows, nq.div_ceil(SAGE_MMA_BLOCK_Q), h, b),
        block_dim: (2 * SAGE_MMA_BLOCK_Q as u32, 1, 1),
        shared_mem_bytes: sage_mma_smem_bytes(d, e4m3_pv) as u32,
    };
    let name = match (e4m3_pv, d, rows.is_some()) {
        (true, 64, false) => "attention_sage_mma_d64",
        (true, _, false) => "attention_sage_mma_d128",
        (true, 64, true) => "attention_sage_mma_e4m3out_d64",
        (true, _, true) => "attention_sage_mma_e4m3out_d128",
        (false, 64, _) => "attention_sage_mma_bf16pv_d64",
        (false, _, _) => "attention_sage_mma_bf16pv_d128",
    };
    launch!(
        be.dev,
        name,
        cfg,
        be.ptr(&qc.codes)?,
        be.ptr(&kc.codes)?,
        vtp,
        be.ptr(&out)?,
        nq32,
        nk32,
        nk_pad as i32,
        h as i32,
        hkv as i32,
        scale,
        causal,
        lp,
        be.ptr(&qc.absmax)?,
        be.ptr(&kc.absmax)?,
        vmp,
        vap,
        rows.map(|r| r.arg(be)).transpose()?.unwrap_or_default()
    )?;
    Ok(out)
}

/// A part of q or k as the fused kernel reads it: its raw bf16 rows in place (tokens `ld`
/// elements apart), its norm weight, its tokens; the tensors are kept alive by the caller.
struct RawPart {
    x: u64,
    ld: i64,
    weight: u64,
    len: usize,
    _keep: [Tensor; 2],
}

/// The parts of q or k when the fused kernel can read them: one or two, each `[b, L, heads, d]`
/// bf16 with its heads contiguous (a slice of a fused projection), weight `[d]`.
fn raw_parts(be: &CudaBackend, parts: &[QkPart], b: usize, heads: usize, d: usize) -> Result<Option<Vec<RawPart>>> {
    if parts.is_empty() || parts.len() > 2 {
        return Ok(None);
    }
    let mut out = Vec::new();
    for p in parts {
        let s = p.x.shape();
        if s.len() != 4 || s[0] != b || s[2] != heads || s[3] != d || p.weight.shape() != [d] {
            return Ok(None); // the composition reports what is wrong
        }
        let Some(ld) = super::reduce::token_stride(p.x).filter(|_| p.x.dtype() == DType::BF16) else {
            return Ok(None);
        };
        let (w, wp) = be.bf16_arg(p.weight, "attention_sage_normed")?;
        out.push(RawPart { x: be.ptr(p.x)?, ld: ld as i64, weight: wp, len: s[1], _keep: [p.x.clone(), w] });
    }
    Ok(Some(out))
}

/// Q's or K's codes from the raw parts (`sums` not 0: K's channel sums instead, into the stats).
#[allow(clippy::too_many_arguments)]
fn norm_rope_int8(
    be: &CudaBackend,
    parts: &[RawPart],
    rope: &QkRope,
    tables: (u64, u64),
    (b, heads, d): (usize, usize, usize),
    mean: u64,
    sums: u64,
    codes: Option<&Codes>,
) -> Result<()> {
    let n: usize = parts.iter().map(|p| p.len).sum();
    let second = parts.get(1);
    let (x1, ld1, w1) = second.map_or((0, 0, 0), |p| (p.x, p.ld, p.weight));
    let (absmax, out) = match codes {
        Some(c) => (be.ptr(&c.absmax)?, be.ptr(&c.codes)?),
        None => (0, 0),
    };
    let interleaved = (rope.pairs == RopePairs::Interleaved) as i32;
    launch!(
        be.dev,
        "sage_norm_rope_int8_bf16",
        per_block(n, b * heads),
        parts[0].x,
        parts[0].ld,
        parts[0].weight,
        parts[0].len as i32,
        x1,
        ld1,
        w1,
        tables.0,
        tables.1,
        n as i32,
        heads as i32,
        d as i32,
        rope.eps,
        interleaved,
        mean,
        sums,
        absmax,
        out
    )
}

/// `attention_sage_normed`: where the tensor-core kernels run and the parts can be read in place,
/// Q's and K's codes come from `sage_norm_rope_int8_bf16` (K: its channel sums first, then its
/// codes against the mean); elsewhere the composition.
pub(super) fn attention_sage_normed(
    be: &CudaBackend,
    q: &[QkPart],
    k: &[QkPart],
    rope: &QkRope,
    v: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    match sage_normed(be, q, k, rope, v, scale, None)? {
        Some(out) => Ok(out),
        None => attention_sage_normed_composed(be, q, k, rope, v, scale),
    }
}

/// `attention_sage_normed`'s fused path, None where it does not apply (the caller composes).
/// With `rows` (which need e4m3 P·V), the attention kernel also writes the output's e4m3 rows;
/// `rows` must be made for this call's `[b, nq, h·d]` output.
pub(super) fn sage_normed(
    be: &CudaBackend,
    q: &[QkPart],
    k: &[QkPart],
    rope: &QkRope,
    v: &Tensor,
    scale: f32,
    rows: Option<&E4m3Rows>,
) -> Result<Option<Tensor>> {
    let (Some(q0), Some(k0)) = (q.first(), k.first()) else { return Ok(None) };
    let (qs, ks, vs) = (q0.x.shape(), k0.x.shape(), v.shape());
    if qs.len() != 4 || ks.len() != 4 || vs.len() != 4 || (rows.is_some() && !e4m3_pv(be)) {
        return Ok(None);
    }
    let (b, h, hkv, d) = (qs[0], qs[2], ks[2], qs[3]);
    let nq: usize = q.iter().map(|p| p.x.shape().get(1).copied().unwrap_or(0)).sum();
    let nk: usize = k.iter().map(|p| p.x.shape().get(1).copied().unwrap_or(0)).sum();
    let dims = [b, nq, h, nk, hkv, d];
    let tables_fit = rope.cos.shape() == rope.sin.shape()
        && rope.cos.rank() == 2
        && rope.cos.dim(0) >= nq.max(nk)
        && rope.cos.dim(1) == d / 2;
    let shapes_fit = vs == [b, nk, hkv, d] && hkv > 0 && h % hkv == 0 && nk > 0 && tables_fit;
    if !shapes_fit || !mma_applies(be, dims) || [nq, nk].iter().any(|&n| n > i32::MAX as usize) {
        return Ok(None);
    }
    rows.map(|r| r.check(b, nq, h * d)).transpose()?;
    let (Some(qp), Some(kp)) = (raw_parts(be, q, b, h, d)?, raw_parts(be, k, b, hkv, d)?) else {
        return Ok(None);
    };
    let (_c, cp) = be.f32_arg(rope.cos, "attention_sage_normed")?;
    let (_s, sp) = be.f32_arg(rope.sin, "attention_sage_normed")?;
    // V read in place when it is a slice of a projection (the single block's), else made dense.
    let (v, v_ld) = super::reduce::token_rows(be, v, "attention_sage_normed")?;
    let (vp, v_ld) = (be.ptr(&v)?, v_ld as i64);
    let stats = KvStats::new(be, dims)?;
    norm_rope_int8(be, &kp, rope, (cp, sp), (b, hkv, d), 0, stats.sums.base_ptr(), None)?;
    stats.finish(be, 0, (vp, v_ld), dims)?;
    let (qc, kc) = (Codes::new(be, b, nq, h, d)?, Codes::new(be, b, nk, hkv, d)?);
    norm_rope_int8(be, &qp, rope, (cp, sp), (b, h, d), 0, 0, Some(&qc))?;
    norm_rope_int8(be, &kp, rope, (cp, sp), (b, hkv, d), be.ptr(&stats.k_mean)?, 0, Some(&kc))?;
    sage_mma(be, &qc, &kc, &stats, (vp, v_ld), dims, &AttnMask::None, scale, rows).map(Some)
}
