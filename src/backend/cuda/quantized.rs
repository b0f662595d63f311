//! Launchers for the 8-bit compute kernels (kernels/quantized.cu; Sage attention v2 on tensor
//! cores in kernels/attention_sage_mma.cu for head dims 64 and 128: P·V on e4m3 mma where the
//! image has it, on bf16 mma with the same products elsewhere; the row-wise kernel for other head
//! dims and as the reference).

use cudarc::driver::LaunchConfig;

use super::{launch, CudaBackend};
use crate::backend::{check, swiglu_beside, AttnMask, QuantTensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Kernel images whose architecture has e4m3 tensor cores (mma.sync m16n8k32 e4m3: sm_89+). The
/// compute_80 PTX does not, whatever card JIT-compiles it.
fn has_fp8_mma(target: &str) -> bool {
    matches!(target, "sm_89" | "sm_90a" | "sm_120")
}

/// FP8 W8A8 linear: v2 (per-token e4m3 codes, tensor cores) where the image has e4m3 mma and rows
/// split into 16-byte chunks; else v1 (CUDA cores, any shape). Same numerics up to f32 rounding.
pub(super) fn linear_fp8(be: &CudaBackend, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (m, k, n) = check::linear_fp8(x, w, bias)?;
    let (_x, xp) = be.bf16_arg(x, "linear_fp8")?;
    let scales = w.scales.as_ref().ok_or_else(|| Error::Gpu("fp8 weight without scales".into()))?;
    let b = bias.map(|b| be.bf16_arg(b, "linear_fp8")).transpose()?;
    let bp = b.as_ref().map_or(0, |(_, p)| *p);
    let out = super::gemm::linear_output(be, x, n)?;
    let rows = super::reduce::per_row("linear_fp8", m, k)?;
    if fp8_mma_applies(be, m, k) {
        let codes = be.output(DType::U8, &[m * k])?;
        let a_scale = be.output(DType::F32, &[m])?;
        let (qp, asp) = (be.ptr(&codes)?, be.ptr(&a_scale)?);
        launch!(be.dev, "quantize_rows_e4m3_bf16", rows, xp, qp, asp, k as i32)?;
        w8a8_mma(be, qp, asp, w, bp, &out, m, n, k)?;
        return Ok(out);
    }
    let absmax = be.output(DType::F32, &[m])?;
    launch!(be.dev, "row_absmax_bf16", rows, xp, be.ptr(&absmax)?, k as i32)?;
    let cfg = super::gemm::tiled_16x16("linear_fp8", m, n)?;
    let (ap, wp, sp, op) = (be.ptr(&absmax)?, be.ptr(&w.data)?, be.ptr(scales)?, be.ptr(&out)?);
    launch!(be.dev, "gemm_w8a8_tiled_bf16", cfg, xp, ap, wp, sp, bp, op, m as i32, n as i32, k as i32, n as i64)?;
    Ok(out)
}

/// v2 of the FP8 linear applies: e4m3 tensor cores in the image, K in 16-byte rows of codes, the
/// rows within one grid of the tensor-core tile.
fn fp8_mma_applies(be: &CudaBackend, m: usize, k: usize) -> bool {
    has_fp8_mma(be.dev.target) && k.is_multiple_of(16) && super::gemm::mma_tile_grid(m, 1).is_some()
}

/// `gemm_w8a8_mma_e4m3` (or its v3, `gemm_wgmma_e4m3`, on sm_90a): out [m, n] from per-token e4m3
/// codes `qp` with scales `asp`.
#[allow(clippy::too_many_arguments)]
fn w8a8_mma(
    be: &CudaBackend,
    qp: u64,
    asp: u64,
    w: &QuantTensor,
    bp: u64,
    out: &Tensor,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let scales = w.scales.as_ref().ok_or_else(|| Error::Gpu("fp8 weight without scales".into()))?;
    let (wp, sp, op) = (be.ptr(&w.data)?, be.ptr(scales)?, be.ptr(out)?);
    if super::gemm_wgmma::applies(be, qp, wp, k, m) {
        return super::gemm_wgmma::e4m3(be, qp, asp, wp, sp, bp, op, m, n, k);
    }
    let cfg = super::gemm::mma_tile_grid(m, n)
        .ok_or_else(|| Error::shape("linear_fp8", format!("{m} rows exceed one grid of the tensor-core tile")))?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    launch!(be.dev, "gemm_w8a8_mma_e4m3", cfg, qp, asp, wp, sp, bp, op, m32, n32, k32, n as i64)
}

/// adaLN feeding an FP8 linear: with v2, `layer_norm_modulate_e4m3_bf16` writes the activation's
/// e4m3 codes and scales straight from x (no bf16 activation), then the tensor-core GEMM; else the
/// two ops.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_modulate_linear_fp8(
    be: &CudaBackend,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
    w: &QuantTensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    check::per_sample("layer_norm_modulate", x, shift)?;
    check::per_sample("layer_norm_modulate", x, scale)?;
    let (m, k, n) = check::linear_fp8(x, w, bias)?;
    if !fp8_mma_applies(be, m, k) {
        let a = super::reduce::layer_norm(be, x, Some((shift, scale)), eps)?;
        return linear_fp8(be, &a, w, bias);
    }
    let (_x, xp) = be.bf16_arg(x, "layer_norm_modulate_linear_fp8")?;
    let (_s, sp, ss) = be.vec_arg(shift, "layer_norm_modulate_linear_fp8")?;
    let (_c, cp, cs) = be.vec_arg(scale, "layer_norm_modulate_linear_fp8")?;
    let b = bias.map(|b| be.bf16_arg(b, "layer_norm_modulate_linear_fp8")).transpose()?;
    let bp = b.as_ref().map_or(0, |(_, p)| *p);
    let out = super::gemm::linear_output(be, x, n)?;
    let codes = be.output(DType::U8, &[m * k])?;
    let a_scale = be.output(DType::F32, &[m])?;
    let (qp, asp) = (be.ptr(&codes)?, be.ptr(&a_scale)?);
    let rows = super::reduce::per_row("layer_norm_modulate_linear_fp8", m, k)?;
    let per_sample = x.dim(1) as i64;
    launch!(be.dev, "layer_norm_modulate_e4m3_bf16", rows, xp, sp, cp, ss, cs, per_sample, eps, qp, asp, k as i32)?;
    w8a8_mma(be, qp, asp, w, bp, &out, m, n, k)?;
    Ok(out)
}

/// The feed-forward's activation feeding an FP8 linear, `[prefix | swiglu(x)]` (or `swiglu(x)`):
/// with v2, `swiglu_concat_e4m3_bf16` writes its e4m3 codes and scales straight from the fused
/// projection's rows (no bf16 activation), then the tensor-core GEMM; else the composition.
pub(super) fn swiglu_linear_fp8(
    be: &CudaBackend,
    prefix: Option<&Tensor>,
    x: &Tensor,
    w: &QuantTensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let m = check::swiglu(x)?;
    let r = x.rank();
    let p = match prefix {
        Some(pre) if pre.rank() == r && pre.shape()[..r - 1] == x.shape()[..r - 1] => pre.last_dim(),
        Some(pre) => {
            return Err(Error::shape("swiglu_linear_fp8", format!("prefix {:?} beside {:?}", pre.shape(), x.shape())))
        }
        None => 0,
    };
    let (rows, k, n) = (x.rows(), p + m, w.rows);
    let rows_fit = super::pointwise::bf16_rows(be, x)?.filter(|_| fp8_mma_applies(be, rows, k));
    let Some((xp, ld)) = rows_fit else {
        return linear_fp8(be, &swiglu_beside(be, prefix, x)?, w, bias);
    };
    if w.format != crate::quant::QuantFormat::Fp8 || w.cols != k {
        let what = format!("{k} activation columns against a {:?} weight [{n}, {}]", w.format, w.cols);
        return Err(Error::shape("swiglu_linear_fp8", what));
    }
    if bias.is_some_and(|b| b.rank() != 1 || b.dim(0) != n) {
        return Err(Error::shape("swiglu_linear_fp8", format!("bias for {n} outputs")));
    }
    let (_pre, pp) = match prefix {
        Some(pre) => {
            let (t, ptr) = be.bf16_arg(pre, "swiglu_linear_fp8")?;
            (Some(t), ptr)
        }
        None => (None, 0),
    };
    let b = bias.map(|b| be.bf16_arg(b, "swiglu_linear_fp8")).transpose()?;
    let bp = b.as_ref().map_or(0, |(_, p)| *p);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    let out = be.output(DType::BF16, &shape)?;
    let codes = be.output(DType::U8, &[rows * k])?;
    let a_scale = be.output(DType::F32, &[rows])?;
    let (qp, asp) = (be.ptr(&codes)?, be.ptr(&a_scale)?);
    let grid = super::reduce::per_row("swiglu_linear_fp8", rows, k)?;
    launch!(be.dev, "swiglu_concat_e4m3_bf16", grid, pp, p as i32, xp, ld as i64, m as i32, qp, asp)?;
    w8a8_mma(be, qp, asp, w, bp, &out, rows, n, k)?;
    Ok(out)
}

/// Tokens per block of the Sage K/V statistics (`SAGE_STATS_TOKENS` in kernels/quantized.cu).
const SAGE_STATS_TOKENS: usize = 256;

/// Dynamic shared memory of attention_sage_mma: the int8 Q tile and two stages of int8 K and Vᵀ
/// tiles of 64 tokens (e4m3 codes, or bf16 values with `e4m3_pv` false), rows padded by 16 bytes.
pub(super) fn sage_mma_smem_bytes(d: usize, e4m3_pv: bool) -> usize {
    let v_row = if e4m3_pv { 64 } else { 128 } + 16;
    64 * (d + 16) + 2 * (64 * (d + 16) + d * v_row)
}

/// The tensor-core Sage kernels whose shared memory exceeds the default 48 KB, with their need.
pub(super) fn sage_mma_big_smem() -> [(&'static str, usize); 1] {
    [("attention_sage_mma_bf16pv_d128", sage_mma_smem_bytes(128, false))]
}

pub(super) fn attention_sage(
    be: &CudaBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f32,
) -> Result<Tensor> {
    let [b, nq, h, nk, hkv, d] = check::attention(q, k, v, mask)?;
    if d > 256 {
        return Err(Error::shape("attention_sage", format!("head dim {d} is above 256")));
    }
    let (_q, qp) = be.bf16_arg(q, "attention_sage")?;
    let (_k, kp) = be.bf16_arg(k, "attention_sage")?;
    let (_v, vp) = be.bf16_arg(v, "attention_sage")?;
    let (qb, kb) = (nq.div_ceil(64), nk.div_ceil(64));
    let k_mean = be.output(DType::F32, &[b * hkv * d])?;
    let v_mean = be.output(DType::F32, &[b * hkv * d])?;
    let q_absmax = be.output(DType::F32, &[b * h * qb])?;
    let k_absmax = be.output(DType::F32, &[b * hkv * kb])?;
    // Both reductions accumulate atomically into zeroed buffers: f64 K and V sums per channel, then
    // |v - mean|max per channel (kept alive until the launches below are queued).
    if b * hkv > 65535 {
        return Err(Error::shape("attention_sage", format!("{b} batch x {hkv} kv heads exceed one grid")));
    }
    let mut sums = be.alloc(DType::F32, 4 * b * hkv * d)?; // 2 doubles per (batch, kv head, channel)
    let mut v_absmax = be.alloc(DType::F32, b * hkv * d)?;
    be.dev.stream.memset_zeros(&mut sums.buf).map_err(super::gpu_err)?;
    be.dev.stream.memset_zeros(&mut v_absmax.buf).map_err(super::gpu_err)?;
    let (kmp, vmp, vap) = (be.ptr(&k_mean)?, be.ptr(&v_mean)?, v_absmax.base_ptr());
    let (qap, kap) = (be.ptr(&q_absmax)?, be.ptr(&k_absmax)?);
    let stats = LaunchConfig {
        grid_dim: (nk.div_ceil(SAGE_STATS_TOKENS).max(1) as u32, (b * hkv) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (nk32, hkv32, d32) = (nk as i32, hkv as i32, d as i32);
    let sp = sums.base_ptr();
    launch!(be.dev, "sage_kv_sums_bf16", stats, kp, vp, sp, nk32, hkv32, d32)?;
    launch!(be.dev, "sage_kv_means_absmax_bf16", stats, vp, sp, kmp, vmp, vap, nk32, hkv32, d32)?;
    let blocks = |n: usize, bh: usize| LaunchConfig {
        grid_dim: (n as u32, bh as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // v1 of the Q/K pre-pass, stage 1: each 64-token block's |x - mean|max (the row-wise kernel's
    // scales; stage 2 writes the tensor-core kernel's codes).
    let block_absmax = || -> Result<()> {
        launch!(be.dev, "sage_block_absmax_bf16", blocks(qb, b * h), qp, 0u64, qap, nq as i32, h as i32, d as i32)?;
        launch!(be.dev, "sage_block_absmax_bf16", blocks(kb, b * hkv), kp, kmp, kap, nk as i32, hkv as i32, d as i32)
    };
    let (causal, _lens, lp) = super::attention::mask_args(be, mask)?;
    let out = be.output(DType::BF16, &[b, nq, h, d])?;
    let reference = be.dev.reference_attention.load(std::sync::atomic::Ordering::Relaxed);
    if (d == 64 || d == 128) && !reference && h <= 65535 && b <= 65535 && nq > 0 {
        // v2 (kernels/attention_sage_mma.cu): int8 codes of Q and K, e4m3 Vᵀ (codes for e4m3 mma,
        // bf16 values for bf16 mma), tensor cores.
        let e4m3_pv = has_fp8_mma(be.dev.target) && !be.dev.sage_bf16_pv.load(std::sync::atomic::Ordering::Relaxed);
        let nk_pad = nk.div_ceil(64) * 64;
        let qc = be.output(DType::U8, &[b * nq * h * d])?;
        let kc = be.output(DType::U8, &[b * nk * hkv * d])?;
        let vt_dtype = if e4m3_pv { DType::U8 } else { DType::BF16 };
        let vt = be.output(vt_dtype, &[b * hkv * d * nk_pad])?;
        let (qcp, kcp, vtp) = (be.ptr(&qc)?, be.ptr(&kc)?, be.ptr(&vt)?);
        let quantize = |total: usize| super::grid_1d(total);
        let (tq, tk, tv) = (b * nq * h * d, b * nk * hkv * d, b * hkv * d * nk_pad);
        let (d32, nq32, nk32) = (d as i32, nq as i32, nk as i32);
        // v2 reads each block with 16-byte loads: q and k must start 16-byte aligned (views may not).
        let v1 = be.dev.sage_quantize_v1.load(std::sync::atomic::Ordering::Relaxed) || (qp | kp) % 16 != 0;
        if v1 {
            block_absmax()?;
            launch!(
                be.dev,
                "sage_quantize_int8_bf16",
                quantize(tq),
                qp,
                0u64,
                qap,
                qcp,
                nq32,
                h as i32,
                d32,
                tq as i64
            )?;
            launch!(
                be.dev,
                "sage_quantize_int8_bf16",
                quantize(tk),
                kp,
                kmp,
                kap,
                kcp,
                nk32,
                hkv as i32,
                d32,
                tk as i64
            )?;
        } else {
            let (h32, hkv32) = (h as i32, hkv as i32);
            launch!(be.dev, "sage_quantize_int8_block_bf16", blocks(qb, b * h), qp, 0u64, qap, qcp, nq32, h32, d32)?;
            launch!(be.dev, "sage_quantize_int8_block_bf16", blocks(kb, b * hkv), kp, kmp, kap, kcp, nk32, hkv32, d32)?;
        }
        launch!(
            be.dev,
            if e4m3_pv { "sage_quantize_vt_e4m3_bf16" } else { "sage_quantize_vt_e4m3_as_bf16" },
            quantize(tv),
            vp,
            vmp,
            vap,
            vtp,
            nk32,
            nk_pad as i32,
            hkv as i32,
            d32,
            tv as i64
        )?;
        let cfg = LaunchConfig {
            grid_dim: (nq.div_ceil(64) as u32, h as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: sage_mma_smem_bytes(d, e4m3_pv) as u32,
        };
        let name = match (e4m3_pv, d) {
            (true, 64) => "attention_sage_mma_d64",
            (true, _) => "attention_sage_mma_d128",
            (false, 64) => "attention_sage_mma_bf16pv_d64",
            (false, _) => "attention_sage_mma_bf16pv_d128",
        };
        launch!(
            be.dev,
            name,
            cfg,
            qcp,
            kcp,
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
            qap,
            kap,
            vmp,
            vap
        )?;
        return Ok(out);
    }
    block_absmax()?;
    let rows = b * nq * h;
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    launch!(
        be.dev,
        "attention_sage_rowwise_bf16",
        cfg,
        qp,
        kp,
        vp,
        be.ptr(&out)?,
        b as i32,
        nq as i32,
        nk as i32,
        h as i32,
        hkv as i32,
        d as i32,
        scale,
        causal,
        lp,
        qap,
        kap,
        kmp,
        vmp,
        vap
    )?;
    Ok(out)
}
