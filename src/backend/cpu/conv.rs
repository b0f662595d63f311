//! 2-D convolution as im2col + GEMM, tiled over output rows to bound the column buffer: in f32
//! (the reference), or with the weight as stored on the mixed-precision GEMM (bf16 precision).

use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::mixed_gemm::{self, Prepared, Weights};
use super::precision::Isa;
use super::{dense, output};
use crate::backend::{check, Padding2d};
use crate::error::Result;
use crate::tensor::Tensor;

/// Column-buffer budget per tile, in f32 elements (64 MiB).
const COL_BUDGET: usize = 16 << 20;

pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, pad: Padding2d) -> Result<Tensor> {
    let (ho, wo) = check::conv2d(x, w, bias, stride, pad)?;
    let (b, cin, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, kh, kw) = (w.dim(0), w.dim(2), w.dim(3));
    let kdim = cin * kh * kw;
    let xv = dense("conv2d", x)?;
    let wv = dense("conv2d", w)?;
    let mut out = vec![0f32; b * cout * ho * wo];
    let threads = rayon::current_num_threads();
    let pointwise = kh == 1 && kw == 1 && stride == 1 && pad == Padding2d::same(0);
    let tile_rows = (COL_BUDGET / (kdim * wo).max(1)).clamp(1, ho.max(1));
    let mut col = if pointwise { Vec::new() } else { vec![0f32; kdim * tile_rows * wo] };

    for bi in 0..b {
        let xb = &xv[bi * cin * h * wd..(bi + 1) * cin * h * wd];
        let ob = unsafe { out.as_mut_ptr().add(bi * cout * ho * wo) };
        if pointwise {
            // out[Cout × HW] = W[Cout × Cin] · x[Cin × HW]
            unsafe {
                sgemm(
                    cout,
                    ho * wo,
                    cin,
                    ob,
                    (ho * wo) as isize,
                    1,
                    Mat { ptr: wv.as_ptr(), rs: cin as isize, cs: 1 },
                    Mat { ptr: xb.as_ptr(), rs: (h * wd) as isize, cs: 1 },
                    false,
                    threads,
                );
            }
            continue;
        }
        for oy0 in (0..ho).step_by(tile_rows) {
            let rows = tile_rows.min(ho - oy0);
            let n = rows * wo;
            col[..kdim * n].par_chunks_mut(n).enumerate().for_each(|(kk, colrow)| {
                let (ci, ky, kx) = (kk / (kh * kw), (kk / kw) % kh, kk % kw);
                let plane = &xb[ci * h * wd..(ci + 1) * h * wd];
                for r in 0..rows {
                    let iy = ((oy0 + r) * stride + ky) as isize - pad.top as isize;
                    for ox in 0..wo {
                        let ix = (ox * stride + kx) as isize - pad.left as isize;
                        colrow[r * wo + ox] = if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < wd {
                            plane[iy as usize * wd + ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            });
            // out[Cout × n] (row stride Ho·Wo) = W[Cout × K] · col[K × n]
            unsafe {
                sgemm(
                    cout,
                    n,
                    kdim,
                    ob.add(oy0 * wo),
                    (ho * wo) as isize,
                    1,
                    Mat { ptr: wv.as_ptr(), rs: kdim as isize, cs: 1 },
                    Mat { ptr: col.as_ptr(), rs: n as isize, cs: 1 },
                    false,
                    threads,
                );
            }
        }
    }
    if let Some(bb) = bias {
        let bv = dense("conv2d", bb)?;
        out.par_chunks_mut((ho * wo).max(1)).enumerate().for_each(|(i, plane)| {
            let v = bv[i % cout];
            plane.iter_mut().for_each(|p| *p += v);
        });
    }
    output(out, &[b, cout, ho, wo])
}

/// Pixels per mixed-GEMM call: the unfolded rows (bf16 tiles on v4, f32 rows on v1–v3) and the
/// GEMM's output stay near 16 MiB together.
const MIXED_TILE_BUDGET: usize = 4 << 20;
/// Output channels per task when the GEMM's pixel-major result is written back.
const CHANNEL_BLOCK: usize = 32;

/// `conv2d` with the weight kept in its stored dtype (bf16, f16, fp8) on the mixed GEMM's path
/// `isa`: each tile of output pixels is unfolded into rows of Cin·kh·kw values (pixel-major, the
/// weight's own order), multiplied by the `Cout × Cin·kh·kw` weight as a linear, and the
/// pixel-major result is written back channel by channel. `None` when the weight is not one the
/// mixed GEMM takes as it is (`Weights::of`: f32, or not one dense block): the f32 `conv2d` then.
pub fn conv2d_mixed(
    isa: Isa,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Padding2d,
) -> Result<Option<Tensor>> {
    let (ho, wo) = check::conv2d(x, w, bias, stride, pad)?;
    let (b, cin, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, kh, kw) = (w.dim(0), w.dim(2), w.dim(3));
    let kdim = cin * kh * kw;
    if !w.is_contiguous() {
        return Ok(None);
    }
    let flat = w.reshape(&[cout, kdim])?;
    let pieces = Weights::of(&flat);
    let Some([weights]) = pieces.as_deref() else {
        return Ok(None);
    };
    let xv = dense("conv2d", x)?;
    let bv = bias.map(|t| dense("conv2d", t)).transpose()?;
    let pixels = ho * wo;
    #[cfg(target_arch = "x86_64")]
    if stride == 1 {
        if let Some(direct) = mixed_gemm::direct_conv(isa, weights, cin, kh, kw) {
            let mut out = vec![0f32; b * cout * pixels];
            for (xb, ob) in xv.chunks_exact(cin * h * wd).zip(out.chunks_exact_mut(cout * pixels)) {
                direct.apply(xb, h, wd, pad, bv.as_deref(), ob);
            }
            return output(out, &[b, cout, ho, wo]).map(Some);
        }
    }
    // Packed once for every pixel tile.
    let prepared = Prepared::new(isa, *weights);
    let tile = (MIXED_TILE_BUDGET / (kdim + cout)).clamp(1, pixels.max(1));
    let mut out = vec![0f32; b * cout * pixels];
    let mut y = vec![0f32; tile * cout];
    for bi in 0..b {
        let xb = &xv[bi * cin * h * wd..(bi + 1) * cin * h * wd];
        let ob = &mut out[bi * cout * pixels..(bi + 1) * cout * pixels];
        for p0 in (0..pixels).step_by(tile) {
            let n = tile.min(pixels - p0);
            // Row i: the Cin·kh·kw inputs under output pixel p0 + i (zeros in the padding).
            let unfold = |i: usize, row: &mut [f32]| {
                let (oy, ox) = ((p0 + i) / wo, (p0 + i) % wo);
                let ix0 = (ox * stride) as isize - pad.left as isize;
                let inside = ix0 >= 0 && ix0 as usize + kw <= wd;
                for ci in 0..cin {
                    let plane = &xb[ci * h * wd..(ci + 1) * h * wd];
                    for ky in 0..kh {
                        let iy = (oy * stride + ky) as isize - pad.top as isize;
                        let dst = &mut row[(ci * kh + ky) * kw..(ci * kh + ky + 1) * kw];
                        if iy < 0 || iy as usize >= h {
                            dst.fill(0.0);
                            continue;
                        }
                        let line = &plane[iy as usize * wd..(iy as usize + 1) * wd];
                        if inside {
                            let src = &line[ix0 as usize..ix0 as usize + kw];
                            // The VAE's 3-wide kernels: three moves, not a memmove call.
                            if let ([d0, d1, d2], [s0, s1, s2]) = (&mut *dst, src) {
                                (*d0, *d1, *d2) = (*s0, *s1, *s2);
                            } else {
                                dst.copy_from_slice(src);
                            }
                            continue;
                        }
                        for (kx, d) in dst.iter_mut().enumerate() {
                            let ix = ix0 + kx as isize;
                            *d = if ix >= 0 && (ix as usize) < wd { line[ix as usize] } else { 0.0 };
                        }
                    }
                }
            };
            mixed_gemm::matmul_rows(isa, n, kdim, unfold, &prepared, &mut y[..n * cout], 0, cout);
            // Pixel-major to channel planes, a block of channels per task: each pixel's values for
            // the block are one contiguous read.
            ob.par_chunks_mut(CHANNEL_BLOCK * pixels).enumerate().for_each(|(blk, planes)| {
                let co0 = blk * CHANNEL_BLOCK;
                let cb = planes.len() / pixels;
                let add: Vec<f32> = (co0..co0 + cb).map(|co| bv.as_ref().map_or(0.0, |b| b[co])).collect();
                for (i, src) in y[..n * cout].chunks_exact(cout).enumerate() {
                    for (c, (v, a)) in src[co0..co0 + cb].iter().zip(&add).enumerate() {
                        planes[c * pixels + p0 + i] = v + a;
                    }
                }
            });
        }
    }
    output(out, &[b, cout, ho, wo]).map(Some)
}
