//! `y = x · Wᵀ` with f32 activations and weights in their stored dtype (bf16, f16, fp8 e4m3),
//! converted inside the GEMM's packing, one panel of columns at a time: no whole-tensor f32 copy.
//! Three versions, chosen at run time (`Isa`): v1 portable (f32 panels + the `gemm` crate),
//! v2 AVX2/FMA, v3 AVX-512 BF16, v4 AMX tiles. The f32 reference is `super::gemm::linear` on widened weights.

mod v1_portable;
#[cfg(target_arch = "x86_64")]
mod v2_avx2;
#[cfg(target_arch = "x86_64")]
mod v3_avx512bf16;
#[cfg(target_arch = "x86_64")]
mod v4_amx;
#[cfg(target_arch = "x86_64")]
mod v4_amx_attention;
#[cfg(target_arch = "x86_64")]
mod v4_amx_conv;
#[cfg(target_arch = "x86_64")]
mod v4_amx_pack;
mod weights;

/// Whether the CPU and OS allow the AMX path (v4).
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx_available() -> bool {
    v4_amx::available()
}

use rayon::prelude::*;

use super::precision::Isa;
use super::{dense, output};
use crate::backend::check;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
pub(crate) use weights::{Code, Weights};

/// The output shared by the column-block tasks (each writes its own columns): the first
/// column's pointer and the row stride.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    pub ptr: *mut f32,
    pub ld: usize,
}
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Column blocks of `n`, multiples of `nr`, enough of them to keep every thread busy.
fn column_blocks(n: usize, nr: usize, max: usize) -> Vec<(usize, usize)> {
    let tasks = 4 * rayon::current_num_threads();
    let nc = (n.div_ceil(tasks).div_ceil(nr) * nr).clamp(nr, max.max(nr));
    (0..n).step_by(nc).map(|j| (j, (j + nc).min(n))).collect()
}

/// `y[:, col0..col0 + n] = x[m×k] · wᵀ` on the chosen path, `y` row-major with `ldy` columns.
/// `isa` must be available (`Isa::available`).
pub(crate) fn matmul(isa: Isa, m: usize, x: &[f32], w: &Weights, y: &mut [f32], col0: usize, ldy: usize) {
    assert!(y.len() == m * ldy && col0 + w.n <= ldy);
    // SAFETY: col0 + n <= ldy, so every write stays inside y.
    unsafe { matmul_to(isa, m, x, w, OutPtr { ptr: y.as_mut_ptr().add(col0), ld: ldy }) }
}

/// Weights v4 takes: bf16 and fp8 e4m3 (exact in bf16), and quantized codes (dequantized to
/// bf16 in the packing, as the GPU's weight-only GEMM does). f16 is not exact in bf16.
fn amx_takes(w: &Weights) -> bool {
    matches!(w.code, Code::Plain(DType::BF16 | DType::F8E4M3) | Code::Quant(..))
}

/// Whether `matmul` on `isa` writes every element of its output (rather than adding to it or
/// leaving some), so the output needs no zeroing first: v4 stores whole accumulator tiles.
fn writes_every_output(isa: Isa, w: &Weights) -> bool {
    cfg!(target_arch = "x86_64") && isa == Isa::Amx && amx_takes(w) && w.k > 0
}

/// `matmul` into `out`: m rows of `out.ld` values from `out.ptr`, columns 0..w.n written.
///
/// # Safety
/// `out` must point to m rows of `out.ld` ≥ `w.n` writable values, with no other writer.
unsafe fn matmul_to(isa: Isa, m: usize, x: &[f32], w: &Weights, out: OutPtr) {
    let (n, k) = (w.n, w.k);
    assert!(x.len() == m * k && n <= out.ld);
    assert!(w.bytes.len() == n * w.row_bytes());
    assert!(isa.available(), "{} is not available on this CPU", isa.name());
    if m == 0 || n == 0 {
        return;
    }
    match isa {
        Isa::Portable => {
            column_blocks(n, 16, 256).into_par_iter().for_each(|(j0, j1)| v1_portable::block(m, x, w, j0, j1, out))
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => column_blocks(n, v2_avx2::NR, 128)
            .into_par_iter()
            // SAFETY: available() checked AVX2 and FMA; blocks write disjoint columns.
            .for_each(|(j0, j1)| unsafe { v2_avx2::block(m, x, w, j0, j1, out) }),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 if w.is(DType::BF16) => {
            let xb = v3_avx512bf16::pack_activations(m, k, x);
            column_blocks(n, v3_avx512bf16::NR, 128)
                .into_par_iter()
                // SAFETY: available() checked AVX-512 F/BW/BF16; blocks write disjoint columns.
                .for_each(|(j0, j1)| unsafe { v3_avx512bf16::block(m, &xb, w, j0, j1, out) })
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Amx if amx_takes(w) => {
            let xb = v4_amx::pack_activations(m, k, x);
            let blocks = amx_column_blocks(n);
            // Each task is told the one after it, which the same worker usually takes next
            // (rayon splits the range in halves), so it can prefetch that task's weights.
            (0..blocks.len()).into_par_iter().for_each(|t| {
                let (j0, j1) = blocks[t];
                // SAFETY: available() checked AMX and AVX-512 BF16; blocks write disjoint columns.
                unsafe { v4_amx::block(m, &xb, w, j0, j1, blocks.get(t + 1).copied(), out) }
            })
        }
        // f16 weights are not exact in bf16: widen them to f32 on the AVX2 path.
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => matmul_to(Isa::Avx2Fma, m, x, w, out),
        // f16, fp8 and quantized weights are not bf16: widen them to f32 (exact) on the AVX2 path.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => matmul_to(Isa::Avx2Fma, m, x, w, out),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable path is available off x86-64"),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use v4_amx_conv::DirectConv;

/// A stride-1 convolution's weight (`[cout × cin·kh·kw]`) packed for v4's direct convolution,
/// which reads the image itself instead of unfolded rows; `None` off that path.
#[cfg(target_arch = "x86_64")]
pub(crate) fn direct_conv(isa: Isa, w: &Weights, cin: usize, kh: usize, kw: usize) -> Option<DirectConv> {
    let fits = isa == Isa::Amx && isa.available() && amx_takes(w);
    // SAFETY: available() checked AMX.
    fits.then(|| unsafe { DirectConv::new(w, cin, kh, kw) })
}

/// Attention fused on v4 tiles for `[b, nq, h, d]` queries `q` against each (batch, kv head)'s
/// prepared K (`n` = keys, `k` = d) and Vᵀ (`n` = d, `k` = keys), query i of batch bi seeing the
/// first `visible(bi, i)` keys: the `[b, nq, h, d]` output, or `None` where it does not apply
/// (not v4, or d not a multiple of 32).
#[cfg(target_arch = "x86_64")]
pub(crate) fn attention_fused(
    [b, nq, h, nk, hkv, d]: [usize; 6],
    q: &[f32],
    heads: &[(Prepared, Prepared)],
    visible: impl Fn(usize, usize) -> usize + Sync,
    scale: f32,
) -> Option<Vec<f32>> {
    let panels: Vec<(&v4_amx::Panels, &v4_amx::Panels)> = heads
        .iter()
        .map(|pair| match pair {
            (Prepared::Amx(k), Prepared::Amx(v)) => Some((k, v)),
            _ => None,
        })
        .collect::<Option<_>>()?;
    if !d.is_multiple_of(32) || nk == 0 || panels.len() != b * hkv {
        return None;
    }
    // Zeroed in parallel: each task writes only its rows of its head.
    let mut out = super::par_filled(b * nq * h * d, 1 << 14, |_, _| {});
    let dst = OutPtr { ptr: out.as_mut_ptr(), ld: h * d };
    let blocks = nq.div_ceil(v4_amx_attention::QB);
    (0..b * h * blocks).into_par_iter().for_each(|task| {
        let dst = dst; // the whole Send wrapper, not its pointer field
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let i0 = blk * v4_amx_attention::QB;
        let base = ((bi * nq + i0) * h + hi) * d;
        let (keys, values) = panels[bi * hkv + hi / (h / hkv)];
        let rows = v4_amx_attention::QB.min(nq - i0);
        let seen: [usize; v4_amx_attention::QB] =
            std::array::from_fn(|r| if r < rows { visible(bi, i0 + r).min(nk) } else { 0 });
        let out = OutPtr { ptr: unsafe { dst.ptr.add(base) }, ld: dst.ld };
        // SAFETY: Prepared::Amx exists only where AMX is available; each task writes its own
        // rows of its own head.
        unsafe { v4_amx_attention::attend(&q[base..], h * d, rows, keys, values, nk, &seen, scale, out) }
    });
    Some(out)
}

/// Column blocks for v4: up to 4 panels a task, so each block of activations loaded serves
/// several panels (k is chunked inside the task to keep its panels' slice in L2). 4 measured
/// ~6% faster than 8 over the DiT's shapes on 2 cores (twice the tasks to balance), 2 no better.
#[cfg(target_arch = "x86_64")]
fn amx_column_blocks(n: usize) -> Vec<(usize, usize)> {
    column_blocks(n, v4_amx::NR, 4 * v4_amx::NR)
}

/// A weight prepared for many products (`matmul_prepared`): on v4 its panels packed once;
/// elsewhere the stored weight (those paths pack per call).
pub(crate) enum Prepared<'a> {
    #[cfg(target_arch = "x86_64")]
    Amx(v4_amx::Panels),
    Stored(Weights<'a>),
}

impl<'a> Prepared<'a> {
    pub fn new(isa: Isa, w: Weights<'a>) -> Prepared<'a> {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Amx && isa.available() && amx_takes(&w) {
            // SAFETY: available() checked AMX.
            return Prepared::Amx(unsafe { v4_amx::pack_weights(&w) });
        }
        Prepared::Stored(w)
    }
}

/// `matmul` with a prepared weight.
pub(crate) fn matmul_prepared(isa: Isa, m: usize, x: &[f32], w: &Prepared, y: &mut [f32], col0: usize, ldy: usize) {
    match w {
        Prepared::Stored(w) => matmul(isa, m, x, w, y, col0, ldy),
        #[cfg(target_arch = "x86_64")]
        Prepared::Amx(p) => {
            assert!(x.len() == m * p.k);
            matmul_rows(isa, m, p.k, |i, row| row.copy_from_slice(&x[i * p.k..(i + 1) * p.k]), w, y, col0, ldy)
        }
    }
}

/// `matmul_prepared` of rows made on the fly by `fill(i, row)` (k values each): an implicit GEMM.
/// v4 packs each row into its tiles straight from a small buffer; the other paths build x first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_rows(
    isa: Isa,
    m: usize,
    k: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
    w: &Prepared,
    y: &mut [f32],
    col0: usize,
    ldy: usize,
) {
    match w {
        #[cfg(target_arch = "x86_64")]
        Prepared::Amx(p) => {
            assert!(k == p.k && y.len() == m * ldy && col0 + p.n <= ldy);
            if m == 0 || p.n == 0 {
                return;
            }
            let out = OutPtr { ptr: unsafe { y.as_mut_ptr().add(col0) }, ld: ldy };
            let xb = v4_amx::pack_rows(m, k, fill);
            amx_column_blocks(p.n)
                .into_par_iter()
                // SAFETY: Prepared::Amx exists only where AMX is available; disjoint columns.
                .for_each(|(j0, j1)| unsafe { v4_amx::block_packed(m, &xb, p, j0, j1, out) })
        }
        _ => {
            let mut x = vec![0f32; m * k];
            x.par_chunks_mut(k.max(1)).enumerate().for_each(|(i, row)| fill(i, row));
            matmul_prepared(isa, m, &x, w, y, col0, ldy)
        }
    }
}

/// `linear` for a weight kept in its stored dtype, on `isa`.
pub fn linear(isa: Isa, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check::linear(x, w, bias)?;
    let pieces = Weights::of(w)
        .ok_or_else(|| Error::shape("linear", "the mixed-precision GEMM needs a dense bf16, f16 or fp8 CPU weight"))?;
    assert_eq!(pieces.iter().map(|p| p.n).sum::<usize>(), w.dim(0), "the weight's pieces cover its rows");
    linear_pieces(isa, x, &pieces, bias)
}

/// `linear_quantized` for codes the CPU keeps (`Weights::of_quantized`), on `isa`: `x` already
/// checked against the weight.
pub(crate) fn linear_quantized(isa: Isa, x: &Tensor, w: Weights, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_pieces(isa, x, &[w], bias)
}

/// `y = x · Wᵀ (+ bias)` for a weight given as row blocks (`pieces`, in order), x `[.., k]`.
fn linear_pieces(isa: Isa, x: &Tensor, pieces: &[Weights], bias: Option<&Tensor>) -> Result<Tensor> {
    if !isa.available() {
        return Err(Error::Unsupported(format!("the {} GEMM path needs a CPU feature this one lacks", isa.name())));
    }
    let n = pieces.iter().map(|p| p.n).sum::<usize>();
    let k = x.last_dim();
    // Checked before any write below relies on it (the callers check x against the whole weight).
    assert!(pieces.iter().all(|p| p.k == k), "the weight's pieces have the input's width");
    let xv = dense("linear", x)?;
    let m = xv.len() / k.max(1);
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    if !pieces.iter().all(|w| writes_every_output(isa, w)) {
        y.resize(m * n, 0.0);
    }
    // Written through a raw pointer: when y is still uninitialised, every element is written
    // before set_len makes it visible (the pieces cover all n columns).
    let base = y.as_mut_ptr();
    let mut col0 = 0;
    for piece in pieces {
        // SAFETY: col0 + piece.n <= n; the allocation holds m·n values.
        unsafe { matmul_to(isa, m, &xv, piece, OutPtr { ptr: base.add(col0), ld: n }) };
        col0 += piece.n;
    }
    // SAFETY: all m·n values were written (or zeroed) above.
    unsafe { y.set_len(m * n) };
    if let Some(b) = bias {
        let bv = dense("linear", b)?;
        y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(bv.iter()).for_each(|(y, b)| *y += b));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    output(y, &shape)
}
