//! Launchers for 2-D convolution: v2, an implicit GEMM on tensor cores (kernels/conv.cu), for every
//! kernel whose input patch fits in shared memory (all of klein's VAE); v1, im2col + the GEMM
//! (kernels/gemm.cu), kept as the reference and for the rest. Layers with at most 8 output
//! channels (the VAE decoder's conv_out) take the narrow CUDA-core kernels instead, where v2's
//! 128-channel tile would be nearly all padding.

use cudarc::driver::LaunchConfig;

use super::gemm::{gemm, Bias};
use super::{grid_1d, launch, CudaBackend};
use crate::backend::{check, Padding2d};
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

/// The v2 kernel and its tile (kernels/conv.cu): 128 output channels by 8 x 16 output pixels,
/// input channels in chunks of 32, 80 bytes per staged position (a 128-row weight stage as well).
pub(super) const MMA_KERNEL: &str = "conv2d_mma_bf16";
const TILE_CHANNELS: usize = 128;
const TILE_ROWS: usize = 8;
const TILE_COLS: usize = 16;
const CHANNEL_CHUNK: usize = 32;
const POSITION_BYTES: usize = 80;

/// The narrow kernels: at most 4 or 8 output channels per thread, kh · kw ≤ 25 taps (their f32
/// weight chunk, 32 channels x taps x 8, stays within the default 48 KB of shared memory).
pub(super) const NARROW_KERNELS: [&str; 2] = ["conv2d_narrow_c4_bf16", "conv2d_narrow_c8_bf16"];
const NARROW_MAX_TAPS: usize = 25;

/// The most dynamic shared memory v2 asks for: under the 99 KB opt-in limit of sm_86/89/120 (and
/// sm_80/90's larger ones). A 3x3 kernel needs 35 KB at stride 1 and 67 KB at stride 2.
pub(super) const MMA_MAX_SMEM: usize = 96 << 10;

/// Dynamic shared memory of v2 for a `kh x kw` kernel at `stride`: two weight stages and the
/// input patch of one pixel tile, its columns stored by phase (kernels/conv.cu).
pub(super) fn mma_smem_bytes(kh: usize, kw: usize, stride: usize) -> usize {
    let rows = (TILE_ROWS - 1) * stride + kh;
    let cols = (TILE_COLS - 1) * stride + kw;
    let width = cols.div_ceil(stride) * stride;
    (2 * TILE_CHANNELS + rows * width) * POSITION_BYTES
}

pub(super) fn conv2d(
    be: &CudaBackend,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: Padding2d,
) -> Result<Tensor> {
    let (ho, wo) = check::conv2d(x, w, bias, stride, pad)?;
    let (b, cout, kh, kw) = (x.dim(0), w.dim(0), w.dim(2), w.dim(3));
    let (_x, xp) = be.bf16_arg(x, "conv2d")?;
    let (_w, wptr) = be.bf16_arg(w, "conv2d")?;
    let bias = bias.map(|b| be.bf16_arg(b, "conv2d")).transpose()?;
    let out = be.output(DType::BF16, &[b, cout, ho, wo])?;
    if b * cout * ho * wo == 0 {
        return Ok(out);
    }
    let geometry =
        Geometry { x: xp, w: wptr, bias: bias.as_ref().map(|(_, p)| *p), x_shape: x.shape(), w_shape: w.shape() };
    let smem = mma_smem_bytes(kh, kw, stride);
    let tiles = ho.div_ceil(TILE_ROWS) * wo.div_ceil(TILE_COLS);
    let narrow = cout <= 8 && kh * kw <= NARROW_MAX_TAPS && (ho * wo).div_ceil(256) <= i32::MAX as usize;
    if narrow && b <= 65535 && !be.dev.conv_v2.load(std::sync::atomic::Ordering::Relaxed) {
        narrow_direct(be, &geometry, &out, stride, pad)?;
    } else if smem <= MMA_MAX_SMEM && tiles <= i32::MAX as usize && b <= 65535 {
        implicit_gemm(be, &geometry, &out, stride, pad, smem, tiles)?;
    } else {
        im2col_gemm(be, &geometry, &out, stride, pad)?;
    }
    Ok(out)
}

/// Device pointers and shapes of one convolution's operands.
struct Geometry<'a> {
    x: u64,
    w: u64,
    bias: Option<u64>,
    x_shape: &'a [usize],
    w_shape: &'a [usize],
}

/// v2: the weights packed [Cout][kh·kw][Cin rounded up to 32], then one launch for every batch,
/// channel block and pixel tile.
fn implicit_gemm(
    be: &CudaBackend,
    g: &Geometry,
    out: &Tensor,
    stride: usize,
    pad: Padding2d,
    smem: usize,
    tiles: usize,
) -> Result<()> {
    let (b, cin, h, wd) = (g.x_shape[0], g.x_shape[1], g.x_shape[2], g.x_shape[3]);
    let (cout, kh, kw) = (g.w_shape[0], g.w_shape[2], g.w_shape[3]);
    let (ho, wo) = (out.dim(2), out.dim(3));
    let taps = kh * kw;
    let cin_pad = cin.next_multiple_of(CHANNEL_CHUNK);
    let packed = be.output(DType::BF16, &[cout, taps, cin_pad])?;
    let pp = be.ptr(&packed)?;
    let (cout32, cin32, taps32, cin_pad32) = (cout as i32, cin as i32, taps as i32, cin_pad as i32);
    launch!(
        be.dev,
        "conv_pack_weight_bf16",
        grid_1d(cout * taps * cin_pad),
        g.w,
        pp,
        cout32,
        cin32,
        taps32,
        cin_pad32
    )?;
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, cout.div_ceil(TILE_CHANNELS) as u32, b as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    launch!(
        be.dev,
        MMA_KERNEL,
        cfg,
        g.x,
        pp,
        g.bias.unwrap_or(0),
        be.ptr(out)?,
        cin32,
        h as i32,
        wd as i32,
        cout32,
        kh as i32,
        kw as i32,
        stride as i32,
        pad.top as i32,
        pad.left as i32,
        ho as i32,
        wo as i32,
        cin_pad32
    )
}

/// Few output channels: one thread per output pixel with all its channels (conv2d_narrow_c4 for
/// up to 4, c8 for up to 8).
fn narrow_direct(be: &CudaBackend, g: &Geometry, out: &Tensor, stride: usize, pad: Padding2d) -> Result<()> {
    let (b, cin, h, wd) = (g.x_shape[0], g.x_shape[1], g.x_shape[2], g.x_shape[3]);
    let (cout, kh, kw) = (g.w_shape[0], g.w_shape[2], g.w_shape[3]);
    let (ho, wo) = (out.dim(2), out.dim(3));
    let (kernel, nc) = if cout <= 4 { (NARROW_KERNELS[0], 4) } else { (NARROW_KERNELS[1], 8) };
    let cfg = LaunchConfig {
        grid_dim: ((ho * wo).div_ceil(256) as u32, b as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (CHANNEL_CHUNK * kh * kw * nc * 4) as u32,
    };
    let (cin, h, wd, cout, kh, kw) = (cin as i32, h as i32, wd as i32, cout as i32, kh as i32, kw as i32);
    let (s, pt, pl, ho, wo) = (stride as i32, pad.top as i32, pad.left as i32, ho as i32, wo as i32);
    launch!(
        be.dev,
        kernel,
        cfg,
        g.x,
        g.w,
        g.bias.unwrap_or(0),
        be.ptr(out)?,
        cin,
        h,
        wd,
        cout,
        kh,
        kw,
        s,
        pt,
        pl,
        ho,
        wo
    )
}

/// Column buffer budget (elements) per im2col chunk of v1: 128 Mi bf16 = 256 MiB.
const COL_BUDGET: usize = 128 << 20;

/// v1: out[Cout, pixels] = W[Cout, K] · col[pixels, K]ᵀ, one chunk of output pixels at a time.
fn im2col_gemm(be: &CudaBackend, g: &Geometry, out: &Tensor, stride: usize, pad: Padding2d) -> Result<()> {
    let (b, cin, h, wd) = (g.x_shape[0], g.x_shape[1], g.x_shape[2], g.x_shape[3]);
    let (cout, kh, kw) = (g.w_shape[0], g.w_shape[2], g.w_shape[3]);
    let (ho, wo) = (out.dim(2), out.dim(3));
    let pixels = ho * wo;
    let kdim = cin * kh * kw;
    let bias = g.bias.map_or(Bias::None, Bias::PerRow);
    let chunk = (COL_BUDGET / kdim.max(1)).clamp(1, pixels.max(1));
    let col = be.output(DType::BF16, &[chunk, kdim])?;
    let colp = be.ptr(&col)?;
    for bi in 0..b {
        let xb = g.x + (bi * cin * h * wd * 2) as u64;
        let ob = be.ptr(out)? + (bi * cout * pixels * 2) as u64;
        for p0 in (0..pixels).step_by(chunk) {
            let np = chunk.min(pixels - p0);
            launch!(
                be.dev,
                "im2col_bf16",
                grid_1d(np * kdim),
                xb,
                colp,
                cin as i32,
                h as i32,
                wd as i32,
                kh as i32,
                kw as i32,
                stride as i32,
                pad.top as i32,
                pad.left as i32,
                wo as i32,
                p0 as i64,
                np as i64
            )?;
            gemm(be, g.w, colp, bias, ob + (p0 * 2) as u64, cout, np, kdim, pixels)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_of_the_vae_kernels_fits_the_opt_in_limit() {
        // 3x3 stride 1: 10 x 18 patch positions; stride 2 (the encoder's downsamplers): 17 x 34.
        assert_eq!(mma_smem_bytes(3, 3, 1), (256 + 180) * 80);
        assert_eq!(mma_smem_bytes(3, 3, 2), (256 + 17 * 34) * 80);
        assert_eq!(mma_smem_bytes(1, 1, 1), (256 + 128) * 80);
        assert!(mma_smem_bytes(3, 3, 2) <= MMA_MAX_SMEM);
        // A 7x7 stride-4 kernel does not fit: v1 runs it (the selftest has such a case).
        assert!(mma_smem_bytes(7, 7, 4) > MMA_MAX_SMEM);
    }
}
