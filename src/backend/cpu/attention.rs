//! Reference attention: S = scale·Q·Kᵀ, masked, softmax in f32 with the row max subtracted,
//! O = P·V. Queries are processed in blocks so the score matrix stays small; blocks of
//! different (batch, head) pairs run in parallel.

use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::{dense, output};
use crate::backend::{check, AttnMask};
use crate::error::Result;
use crate::tensor::Tensor;

const QUERY_BLOCK: usize = 128;

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
    let [b, nq, h, nk, hkv, d] = check::attention(q, k, v, mask)?;
    let (qv, kv, vv) = (dense("attention", q)?, dense("attention", k)?, dense("attention", v)?);
    let mut out = vec![0f32; b * nq * h * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let group = h / hkv;
    let blocks = nq.div_ceil(QUERY_BLOCK);
    let (causal, valid_len) = match mask {
        AttnMask::None => (false, None),
        AttnMask::Causal { valid_len } => (true, valid_len.as_ref()),
    };

    (0..b * h * blocks).into_par_iter().for_each(|task| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let hk = hi / group;
        let i0 = blk * QUERY_BLOCK;
        let rows = QUERY_BLOCK.min(nq - i0);
        let keys_valid = valid_len.map_or(nk, |l| l[bi]);
        let mut s = vec![0f32; rows * nk];
        let q_base = ((bi * nq + i0) * h + hi) * d;
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
            let visible = if causal { (i0 + r + 1).min(keys_valid) } else { nk };
            softmax_prefix(row, visible, scale);
        }
        unsafe {
            // O[rows × d] = P[rows × nk] · V[nk × d]
            sgemm(
                rows,
                d,
                nk,
                out_ptr.get().add(q_base),
                (h * d) as isize,
                1,
                Mat { ptr: s.as_ptr(), rs: nk as isize, cs: 1 },
                Mat { ptr: vv.as_ptr().add(kv_base), rs: (hkv * d) as isize, cs: 1 },
                false,
                1,
            );
        }
    });
    output(out, &[b, nq, h, d])
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
