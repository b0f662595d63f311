//! CPU emulations of the 8-bit compute paths, with the same rounding as the GPU kernels, so their
//! accuracy is testable without a GPU and each kernel is checked against its emulation.
//!
//! FP8 linear (W8A8): activations scaled per token so |x|max maps to 448 and rounded to e4m3,
//! weights e4m3 per output channel (their dequantized values are the reference weight), f32
//! accumulation.
//!
//! Sage-style attention, per (batch, head): K smoothed by its mean over tokens (softmax is
//! unchanged by a per-query constant); Q and K rounded to int8 with one scale per block of 64
//! tokens; scores from exact integer dot products; online softmax over key tiles of 64 in f32;
//! probabilities (≤ 1 relative to the running max) rounded to e4m3 after scaling by 448; V smoothed
//! by its token mean (added back to the output: the probabilities sum to one) and rounded to e4m3
//! with one scale per channel; P·V accumulated in f32.

use rayon::prelude::*;

use super::{dense, output};
use crate::backend::{check, AttnMask};
use crate::dtype::F8E4M3_MAX;
use crate::error::Result;
use crate::tensor::Tensor;

pub const SAGE_BLOCK: usize = 64;

/// x rounded to the nearest e4m3 value (saturating), as the GPU's fp8 conversions do.
#[inline(always)]
pub fn fp8_round(x: f32) -> f32 {
    crate::dtype::f8e4m3_round(x)
}

/// Per-token fp8 rounding of activations: row r becomes `fp8(x / s_r) · s_r`, s_r = |x_r|max / 448.
pub fn quantize_rows_fp8(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(cols.max(1)).zip(x.par_chunks(cols.max(1))).for_each(|(o, row)| {
        let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / F8E4M3_MAX;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        o.iter_mut().zip(row).for_each(|(o, &v)| *o = fp8_round(v * inv) * s);
    });
    out
}

pub fn linear_fp8(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check::linear(x, w, bias)?;
    let xq = quantize_rows_fp8(&dense("linear_fp8", x)?, x.last_dim());
    super::gemm::linear(&Tensor::from_f32(xq, x.shape())?, w, bias)
}

#[inline]
fn int8_round(x: f32) -> f32 {
    x.round_ties_even().clamp(-127.0, 127.0)
}

pub fn attention_sage(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
    let [b, nq, h, nk, hkv, d] = check::attention(q, k, v, mask)?;
    let (qv, kv, vv) = (dense("attention_sage", q)?, dense("attention_sage", k)?, dense("attention_sage", v)?);
    let group = h / hkv;
    let (causal, lens) = match mask {
        AttnMask::None => (false, None),
        AttnMask::Causal { valid_len } => (true, valid_len.clone()),
    };
    // Per (batch, kv head): smoothed, int8-rounded K with block scales; fp8 V with channel scales.
    struct Kv {
        k: Vec<f32>,
        k_scale: Vec<f32>,
        v: Vec<f32>,
        v_scale: Vec<f32>,
        v_mean: Vec<f32>,
    }
    let kvs: Vec<Kv> = (0..b * hkv)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / hkv, bh % hkv);
            let at = |j: usize, c: usize| ((bi * nk + j) * hkv + hi) * d + c;
            let mean: Vec<f32> =
                (0..d).map(|c| (0..nk).map(|j| kv[at(j, c)] as f64).sum::<f64>() as f32 / nk.max(1) as f32).collect();
            let mut k = vec![0f32; nk * d];
            let mut k_scale = vec![0f32; nk.div_ceil(SAGE_BLOCK)];
            for (blk, s) in k_scale.iter_mut().enumerate() {
                let rows = blk * SAGE_BLOCK..((blk + 1) * SAGE_BLOCK).min(nk);
                *s = rows
                    .clone()
                    .flat_map(|j| (0..d).map(move |c| (j, c)))
                    .fold(0f32, |m, (j, c)| m.max((kv[at(j, c)] - mean[c]).abs()))
                    / 127.0;
                let inv = if *s > 0.0 { 1.0 / *s } else { 0.0 };
                for j in rows {
                    for c in 0..d {
                        k[j * d + c] = int8_round((kv[at(j, c)] - mean[c]) * inv);
                    }
                }
            }
            let v_mean: Vec<f32> =
                (0..d).map(|c| (0..nk).map(|j| vv[at(j, c)] as f64).sum::<f64>() as f32 / nk.max(1) as f32).collect();
            let v_scale: Vec<f32> = (0..d)
                .map(|c| (0..nk).fold(0f32, |m, j| m.max((vv[at(j, c)] - v_mean[c]).abs())) / F8E4M3_MAX)
                .collect();
            let mut v = vec![0f32; nk * d];
            for j in 0..nk {
                for c in 0..d {
                    let inv = if v_scale[c] > 0.0 { 1.0 / v_scale[c] } else { 0.0 };
                    v[j * d + c] = fp8_round((vv[at(j, c)] - v_mean[c]) * inv);
                }
            }
            Kv { k, k_scale, v, v_scale, v_mean }
        })
        .collect();

    let q_blocks = nq.div_ceil(SAGE_BLOCK);
    let mut out = vec![0f32; b * nq * h * d];
    let rows: Vec<(usize, usize, usize)> =
        (0..b).flat_map(|bi| (0..h).flat_map(move |hi| (0..q_blocks).map(move |qb| (bi, hi, qb)))).collect();
    let results: Vec<(usize, usize, usize, Vec<f32>)> = rows
        .into_par_iter()
        .map(|(bi, hi, qb)| {
            let kvh = &kvs[bi * hkv + hi / group];
            let qrows = qb * SAGE_BLOCK..((qb + 1) * SAGE_BLOCK).min(nq);
            let qat = |i: usize, c: usize| ((bi * nq + i) * h + hi) * d + c;
            let sq = qrows
                .clone()
                .flat_map(|i| (0..d).map(move |c| (i, c)))
                .fold(0f32, |m, (i, c)| m.max(qv[qat(i, c)].abs()))
                / 127.0;
            let inv_q = if sq > 0.0 { 1.0 / sq } else { 0.0 };
            let valid = lens.as_ref().map_or(nk, |l| l[bi]);
            let mut block_out = vec![0f32; qrows.len() * d];
            for (r, i) in qrows.clone().enumerate() {
                let qi: Vec<f32> = (0..d).map(|c| int8_round(qv[qat(i, c)] * inv_q)).collect();
                let kend = if causal { (i + 1).min(valid) } else { nk };
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                let mut acc = vec![0f32; d];
                for t0 in (0..kend).step_by(SAGE_BLOCK) {
                    let t1 = (t0 + SAGE_BLOCK).min(kend);
                    let scores: Vec<f32> = (t0..t1)
                        .map(|j| {
                            let dot: i64 = (0..d).map(|c| qi[c] as i64 * kvh.k[j * d + c] as i64).sum();
                            dot as f32 * (sq * kvh.k_scale[j / SAGE_BLOCK]) * scale
                        })
                        .collect();
                    let m_new = scores.iter().fold(m, |a, &s| a.max(s));
                    let alpha = if m == f32::NEG_INFINITY { 0.0 } else { (m - m_new).exp() };
                    l *= alpha;
                    acc.iter_mut().for_each(|a| *a *= alpha);
                    for (jj, &s) in scores.iter().enumerate() {
                        let p = (s - m_new).exp();
                        l += p;
                        let pq = fp8_round(p * F8E4M3_MAX);
                        let j = t0 + jj;
                        for c in 0..d {
                            acc[c] += pq * kvh.v[j * d + c];
                        }
                    }
                    m = m_new;
                }
                for c in 0..d {
                    block_out[r * d + c] =
                        if l > 0.0 { acc[c] * kvh.v_scale[c] / F8E4M3_MAX / l + kvh.v_mean[c] } else { 0.0 };
                }
            }
            (bi, hi, qb, block_out)
        })
        .collect();
    for (bi, hi, qb, block) in results {
        for (r, row) in block.chunks(d).enumerate() {
            let i = qb * SAGE_BLOCK + r;
            let o = ((bi * nq + i) * h + hi) * d;
            out[o..o + d].copy_from_slice(row);
        }
    }
    output(out, &[b, nq, h, d])
}
