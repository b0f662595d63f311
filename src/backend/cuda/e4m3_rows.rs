//! The attention output as the FP8 linears' activations, written by the attention kernel itself
//! (kernels/e4m3_rows.cuh): the double block's attention feeding its two output projections
//! (`attention_sage_normed_linear_fp8_gated_add`, `attention_linear_fp8_gated_add`). The kernels
//! `attention_sage_mma_e4m3out_d*` / `attention_sage_wgmma_e4m3out_d128` (Sage v2 / v3) and
//! `flash_attention_v3_e4m3out_d*` / `flash_attention_v4_e4m3out_d*` store the bf16 output as before,
//! max-reduce each token's |max| across the heads' blocks, and the block completing a query tile's
//! heads writes the tile's e4m3 codes and per-token scales, the values `quantize_rows_e4m3_bf16` makes
//! from the stored output: the GEMMs get the same operands as in the composition, without its
//! quantize passes over the output (one per projection).

use cudarc::driver::DeviceRepr;

use super::gemm::Residual;
use super::quantized::{fp8_mma_applies, w8a8_mma};
use super::{CudaBackend, CudaStorage};
use crate::backend::{
    attention_linear_fp8_composed, attention_sage_normed_linear_fp8_composed, check, GatedFp8, QkPart, QkRope,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::QuantFormat;
use crate::tensor::Tensor;

const OP: &str = "attention_linear_fp8_gated_add";

/// The kernels' `E4m3Split` argument (kernels/e4m3_rows.cuh); the default (null) for kernels that
/// take it without writing rows.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct E4m3Split {
    codes: [u64; 2],
    scales: [u64; 2],
    scratch: u64,
    split: i32,
    pad: i32,
}
unsafe impl DeviceRepr for E4m3Split {}

/// The e4m3 rows of an attention output `[b, nq, cols]` split per sample at token `split`: part 0
/// holds the first `split` tokens of every sample (codes `[b·split, cols]`, scales `[b·split]`),
/// part 1 the rest. The kernels' scratch (the tokens' maxima, then a count per query tile: at most
/// one per token) is zeroed here, before the launch that uses it.
pub(super) struct E4m3Rows {
    codes: [Tensor; 2],
    scales: [Tensor; 2],
    scratch: CudaStorage,
    shape: [usize; 3],
    split: usize,
}

impl E4m3Rows {
    pub(super) fn new(be: &CudaBackend, [b, nq, cols]: [usize; 3], split: usize) -> Result<E4m3Rows> {
        let rows = [b * split, b * (nq - split)];
        let mut scratch = be.alloc(DType::F32, 2 * b * nq)?; // 32-bit words
        be.dev.stream.memset_zeros(&mut scratch.buf).map_err(super::gpu_err)?;
        Ok(E4m3Rows {
            codes: [be.output(DType::U8, &[rows[0] * cols])?, be.output(DType::U8, &[rows[1] * cols])?],
            scales: [be.output(DType::F32, &[rows[0]])?, be.output(DType::F32, &[rows[1]])?],
            scratch,
            shape: [b, nq, cols],
            split,
        })
    }

    /// An error unless these rows were made for an output `[b, nq, cols]`.
    pub(super) fn check(&self, b: usize, nq: usize, cols: usize) -> Result<()> {
        if self.shape != [b, nq, cols] {
            return Err(Error::Gpu(format!(
                "e4m3 rows made for {:?}, not for an output [{b}, {nq}, {cols}]",
                self.shape
            )));
        }
        Ok(())
    }

    /// The grid of an attention kernel's query tiles, heads and samples: heads fastest for the
    /// kernels writing rows (`rows` given: a tile completes while later tiles still compute), query
    /// tiles fastest for the others.
    pub(super) fn grid(rows: Option<&E4m3Rows>, tiles: usize, heads: usize, b: usize) -> (u32, u32, u32) {
        let (tiles, heads, b) = (tiles as u32, heads as u32, b as u32);
        if rows.is_some() {
            (heads, tiles, b)
        } else {
            (tiles, heads, b)
        }
    }

    pub(super) fn arg(&self, be: &CudaBackend) -> Result<E4m3Split> {
        Ok(E4m3Split {
            codes: [be.ptr(&self.codes[0])?, be.ptr(&self.codes[1])?],
            scales: [be.ptr(&self.scales[0])?, be.ptr(&self.scales[1])?],
            scratch: self.scratch.base_ptr(),
            split: self.split as i32,
            pad: 0,
        })
    }
}

/// `attention_sage_normed_linear_fp8_gated_add`: the Sage kernels write the rows where they run
/// on tensor cores with e4m3 P·V (`sage::sage_normed`).
pub(super) fn attention_sage_normed_linear_fp8(
    be: &CudaBackend,
    q: &[QkPart],
    k: &[QkPart],
    rope: &QkRope,
    v: &Tensor,
    scale: f32,
    outs: [GatedFp8; 2],
) -> Result<[Tensor; 2]> {
    let composed = || attention_sage_normed_linear_fp8_composed(be, q, k, rope, v, scale, outs);
    let Some(shape) = q.first().map(|p| p.x.shape()).filter(|s| s.len() == 4) else { return composed() };
    let nq: usize = q.iter().map(|p| p.x.shape().get(1).copied().unwrap_or(0)).sum();
    let dims = [shape[0], nq, shape[2] * shape[3]];
    let attend = |rows: &E4m3Rows| super::sage::sage_normed(be, q, k, rope, v, scale, Some(rows));
    attention_fp8_projections(be, dims, outs, attend, composed)
}

/// `attention_linear_fp8_gated_add`: flash attention's kernels (v3, v4 on sm_90a) write the rows at
/// head dims 64 and 128 (`attention::attention_rows`).
pub(super) fn attention_linear_fp8(
    be: &CudaBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    outs: [GatedFp8; 2],
) -> Result<[Tensor; 2]> {
    let composed = || attention_linear_fp8_composed(be, q, k, v, scale, outs);
    if q.rank() != 4 {
        return composed();
    }
    let dims = [q.dim(0), q.dim(1), q.dim(2) * q.dim(3)];
    let attend = |rows: &E4m3Rows| super::attention::attention_rows(be, q, k, v, scale, rows);
    attention_fp8_projections(be, dims, outs, attend, composed)
}

/// An attention whose output `[b, nq, cols]` feeds two FP8 projections split per sample at
/// `outs[0]`'s tokens: where both run the tensor-core FP8 GEMM (v2, or v3 on sm_90a) and `attend`
/// (the attention, writing the e4m3 rows) runs, each GEMM reads its part of the rows, the gated
/// residual in its epilogue; elsewhere (and for shapes the composition reports as wrong)
/// `composed`.
fn attention_fp8_projections(
    be: &CudaBackend,
    [b, nq, cols]: [usize; 3],
    outs: [GatedFp8; 2],
    attend: impl FnOnce(&E4m3Rows) -> Result<Option<Tensor>>,
    composed: impl FnOnce() -> Result<[Tensor; 2]>,
) -> Result<[Tensor; 2]> {
    let Ok(split) = check::token_split(outs[0].x, outs[1].x, b, nq) else { return composed() };
    // Every e4m3out kernel's grid holds its 128-query tiles in y (E4m3Rows::grid).
    if nq.div_ceil(128) > 65535 || b > 65535 {
        return composed();
    }
    let lens = [split, nq - split];
    let fused = outs.iter().zip(lens).all(|(o, l)| {
        let r = Residual { x: o.x, gate: o.gate };
        o.w.format == QuantFormat::Fp8
            && o.w.cols == cols
            && fp8_mma_applies(be, b * l, cols)
            && r.fits_kernels()
            && r.check(OP, &[b, l, o.w.rows]).is_ok()
    });
    if !fused {
        return composed();
    }
    let rows = E4m3Rows::new(be, [b, nq, cols], split)?;
    if attend(&rows)?.is_none() {
        return composed();
    }
    let project = |i: usize| -> Result<Tensor> {
        let (o, l) = (&outs[i], lens[i]);
        let gated = Residual { x: o.x, gate: o.gate }.operands(be, OP)?;
        let out = be.output(DType::BF16, &[b, l, o.w.rows])?;
        let (qp, sp) = (be.ptr(&rows.codes[i])?, be.ptr(&rows.scales[i])?);
        w8a8_mma(be, qp, sp, o.w, 0, &out, (b * l, o.w.rows, cols), Some(gated.args))?;
        Ok(out)
    };
    Ok([project(0)?, project(1)?])
}
