//! 2-D convolution as im2col + GEMM, tiled over output rows to bound the column buffer.

use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
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
