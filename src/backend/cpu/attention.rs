//! Attention: S = scale·Q·Kᵀ, masked, softmax in f32 with the row max subtracted, O = P·V.
//! Queries are processed in blocks so the score matrix stays small; blocks of different (batch,
//! head) pairs run in parallel. The reference computes both products in f32 (`gemm` crate); in
//! bf16 precision (`attention_mixed`) they run on the mixed GEMM with Q, K, P and V rounded to bf16,
//! as PyTorch's bf16 attention sees them, K and Vᵀ converted (and on v4 packed) once per head.

use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::mixed_gemm::{self, Prepared, Weights};
use super::precision::Isa;
use super::{dense, fast_math, output};
use crate::backend::{check, AttnMask};
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

const QUERY_BLOCK: usize = 128;
/// Query rows per block on the mixed path (its score rows stay in L2).
const MIXED_QUERY_BLOCK: usize = 256;

/// Pointer that may cross threads; each task writes a disjoint set of output rows.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    // A method (not field access) so closures capture the whole Send wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
    let dims @ [_, _, h, nk, hkv, d] = check::attention(q, k, v, mask)?;
    let (qv, kv, vv) = (dense("attention", q)?, dense("attention", k)?, dense("attention", v)?);
    over_query_blocks(dims, QUERY_BLOCK, |blk, out| {
        let QueryBlock { bi, hk, i0, rows, q_base } = blk;
        let mut s = vec![0f32; rows * nk];
        let kv_base = (bi * nk * hkv + hk) * d;
        unsafe {
            // S[rows × nk] = Q[rows × d] · Kᵀ[d × nk]
            sgemm(
                rows,
                nk,
                d,
                s.as_mut_ptr(),
                nk as isize,
                1,
                Mat { ptr: qv.as_ptr().add(q_base), rs: (h * d) as isize, cs: 1 },
                Mat { ptr: kv.as_ptr().add(kv_base), rs: 1, cs: (hkv * d) as isize },
                false,
                1,
            );
        }
        for (r, row) in s.chunks_exact_mut(nk).enumerate() {
            softmax_prefix(row, visible_keys(mask, bi, i0 + r, nk), scale);
        }
        unsafe {
            // O[rows × d] = P[rows × nk] · V[nk × d]
            sgemm(
                rows,
                d,
                nk,
                out.get().add(q_base),
                (h * d) as isize,
                1,
                Mat { ptr: s.as_ptr(), rs: nk as isize, cs: 1 },
                Mat { ptr: vv.as_ptr().add(kv_base), rs: (hkv * d) as isize, cs: 1 },
                false,
                1,
            );
        }
    })
}

/// One task: `rows` queries from query `i0` of head `hi` (reading kv head `hk`) in batch `bi`;
/// `q_base` is the index of its first query's first element in Q and in the output.
#[derive(Clone, Copy)]
struct QueryBlock {
    bi: usize,
    hk: usize,
    i0: usize,
    rows: usize,
    q_base: usize,
}

/// Runs `f` on every block of `block` queries of every (batch, head), in parallel, and returns the
/// `[b, nq, h, d]` output it wrote (each block its own rows, through the pointer it is given).
fn over_query_blocks(
    [b, nq, h, _, hkv, d]: [usize; 6],
    block: usize,
    f: impl Fn(QueryBlock, SendPtr) + Sync + Send,
) -> Result<Tensor> {
    let mut out = vec![0f32; b * nq * h * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let blocks = nq.div_ceil(block);
    (0..b * h * blocks).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let i0 = blk * block;
        let (hk, rows, q_base) = (hi / (h / hkv), block.min(nq - i0), ((bi * nq + i0) * h + hi) * d);
        f(QueryBlock { bi, hk, i0, rows, q_base }, out_ptr)
    });
    output(out, &[b, nq, h, d])
}

/// How many keys (a prefix) query `i` of batch `bi` sees under `mask`.
fn visible_keys(mask: &AttnMask, bi: usize, i: usize, nk: usize) -> usize {
    match mask {
        AttnMask::None => nk,
        AttnMask::Causal { valid_len } => (i + 1).min(valid_len.as_ref().map_or(nk, |l| l[bi])),
    }
}

/// `attention` on the mixed GEMM's path `isa` (bf16 operands, f32 accumulation and softmax).
pub fn attention_mixed(isa: Isa, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
    let dims @ [b, _, h, nk, hkv, d] = check::attention(q, k, v, mask)?;
    let (qv, kv, vv) = (dense("attention", q)?, dense("attention", k)?, dense("attention", v)?);
    let bf16 = |x: f32| half::bf16::from_f32(x).to_bits().to_le_bytes();
    // Per (batch, kv head): K as `nk × d` and Vᵀ as `d × nk`, bf16.
    let heads: Vec<(Vec<u8>, Vec<u8>)> = (0..b * hkv)
        .into_par_iter()
        .map(|bh| {
            let (bi, hk) = (bh / hkv, bh % hkv);
            let (mut kb, mut vt) = (vec![0u8; 2 * nk * d], vec![0u8; 2 * nk * d]);
            for t in 0..nk {
                let at = (bi * nk + t) * hkv * d + hk * d;
                for c in 0..d {
                    kb[2 * (t * d + c)..2 * (t * d + c) + 2].copy_from_slice(&bf16(kv[at + c]));
                    vt[2 * (c * nk + t)..2 * (c * nk + t) + 2].copy_from_slice(&bf16(vv[at + c]));
                }
            }
            (kb, vt)
        })
        .collect();
    // Packed once per head for all its query blocks (v4).
    let prepared: Vec<(Prepared, Prepared)> = heads
        .iter()
        .map(|(kb, vt)| {
            (
                Prepared::new(isa, Weights::plain(kb, DType::BF16, nk, d)),
                Prepared::new(isa, Weights::plain(vt, DType::BF16, d, nk)),
            )
        })
        .collect();
    #[cfg(target_arch = "x86_64")]
    if let Some(out) = mixed_gemm::attention_fused(dims, &qv, &prepared, |bi, i| visible_keys(mask, bi, i, nk), scale) {
        return output(out, q.shape());
    }
    over_query_blocks(dims, MIXED_QUERY_BLOCK, |blk, out| {
        let QueryBlock { bi, hk, i0, rows, q_base } = blk;
        let (keys, values) = &prepared[bi * hkv + hk];
        let qb: Vec<f32> = (0..rows).flat_map(|r| &qv[q_base + r * h * d..q_base + r * h * d + d]).copied().collect();
        let mut s = vec![0f32; rows * nk];
        mixed_gemm::matmul_prepared(isa, rows, &qb, keys, &mut s, 0, nk);
        for (r, row) in s.chunks_exact_mut(nk).enumerate() {
            softmax_prefix_fast(row, visible_keys(mask, bi, i0 + r, nk), scale);
        }
        let mut o = vec![0f32; rows * d];
        mixed_gemm::matmul_prepared(isa, rows, &s, values, &mut o, 0, d);
        for (r, row) in o.chunks_exact(d).enumerate() {
            // SAFETY: each task writes its own query rows of its own head.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.get().add(q_base + r * h * d), d) };
        }
    })
}

/// In-place softmax of `scale·row[..visible]`; entries from `visible` on get probability 0.
/// A row with no visible key becomes all zeros (its output is zero).
fn softmax_prefix(row: &mut [f32], visible: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(visible);
    masked.fill(0.0);
    if live.is_empty() {
        return;
    }
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let mut sum = 0f64;
    for x in live.iter_mut() {
        *x = (*x * scale - max).exp();
        sum += *x as f64;
    }
    let inv = (1.0 / sum) as f32;
    live.iter_mut().for_each(|x| *x *= inv);
}

/// `softmax_prefix` with a polynomial exp (relative error below 2e-7·(1 + |x|)) for the bf16 path, where
/// the f32 exp's call per element would cost more than the products; 16 lanes where AVX-512 is.
fn softmax_prefix_fast(row: &mut [f32], visible: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(visible);
    masked.fill(0.0);
    if live.is_empty() {
        return;
    }
    fast_math::vectorised(|| {
        let max = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
        let mut sums = [0f32; 16];
        let mut chunks = live.chunks_exact_mut(16);
        for chunk in &mut chunks {
            for (x, s) in chunk.iter_mut().zip(sums.iter_mut()) {
                *x = fast_math::exp_nonpositive(*x * scale - max);
                *s += *x;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = fast_math::exp_nonpositive(*x * scale - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        live.iter_mut().for_each(|x| *x *= inv);
    })
}
