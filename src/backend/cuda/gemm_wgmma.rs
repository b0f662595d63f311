//! Launchers for the v3 GEMMs on Hopper (kernels/gemm_wgmma.cu): warp-specialised wgmma fed by
//! TMA, for sm_90a images only. `gemm` (bf16) and the FP8 W8A8 linear pick them where they apply,
//! unless `CudaBackend::set_gemm_v2` asks for the v2 kernels (mma.sync), their references.

use std::sync::atomic::Ordering;

use cudarc::driver::LaunchConfig;

use super::gemm::Bias;
use super::tensor_map::{row_major_128b, TileElem};
use super::{launch, CudaBackend};
use crate::error::Result;

pub(super) const BF16_KERNEL: &str = "gemm_wgmma_bf16";
pub(super) const GATED_KERNEL: &str = "gemm_wgmma_gated_bf16";
pub(super) const E4M3_KERNEL: &str = "gemm_wgmma_e4m3";
/// The one image target with wgmma.
pub(super) const V3_TARGET: &str = "sm_90a";
/// Every v3 kernel (launched on sm_90a images only).
pub(super) const KERNELS: [&str; 3] = [BF16_KERNEL, GATED_KERNEL, E4M3_KERNEL];

/// The kernels' dynamic shared memory (WG_SMEM_BYTES): 1 KB of alignment slack, 5 stages of a
/// 128x128-byte A and W slice, 8 consumer warps' 16 x 136 bf16 epilogue buffers, and the stages'
/// two mbarriers.
const SMEM_BYTES: usize = 1024 + 2 * 5 * 128 * 128 + 8 * 16 * 136 * 2 + 2 * 5 * 8;

/// The kernels needing the opt-in shared-memory attribute, for images that have them running.
pub(super) fn big_smem(target: &str) -> Vec<(&'static str, usize)> {
    if target == V3_TARGET {
        KERNELS.iter().map(|&k| (k, SMEM_BYTES)).collect()
    } else {
        Vec::new()
    }
}

/// v3 applies: an sm_90a image, v2 not requested, A and W 16-byte aligned with non-empty rows of a
/// multiple of 16 bytes (the tensor maps' requirements), at most 65535 row tiles (so the kernel's
/// 32-bit tile indices hold for any width up to 4M columns).
pub(super) fn applies(be: &CudaBackend, a: u64, w: u64, row_bytes: usize, m: usize) -> bool {
    be.has_gemm_v3()
        && !be.dev.gemm_v2.load(Ordering::Relaxed)
        && a.is_multiple_of(16)
        && w.is_multiple_of(16)
        && row_bytes > 0
        && row_bytes.is_multiple_of(16)
        && m.div_ceil(128) <= 65535
}

/// Persistent blocks: one per SM (at most one per 128x128 output tile), each walking the tiles.
fn grid(be: &CudaBackend, m: usize, n: usize) -> LaunchConfig {
    let tiles = m.div_ceil(128) * n.div_ceil(128);
    LaunchConfig {
        grid_dim: (tiles.min(be.dev.sms.max(1)) as u32, 1, 1),
        block_dim: (384, 1, 1),
        shared_mem_bytes: SMEM_BYTES as u32,
    }
}

/// C[m, n] (leading dimension ldc) = A [m, k] · W [n, k]ᵀ + bias, bf16 (gemm_mma_bf16's contract).
#[allow(clippy::too_many_arguments)]
pub(super) fn bf16(
    be: &CudaBackend,
    a: u64,
    w: u64,
    bias: Bias,
    c: u64,
    m: usize,
    n: usize,
    k: usize,
    ldc: usize,
) -> Result<()> {
    let ta = row_major_128b(a, TileElem::Bf16, m, k, 128)?;
    let tw = row_major_128b(w, TileElem::Bf16, n, k, 128)?;
    let (bp, mode) = bias.args();
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    launch!(be.dev, BF16_KERNEL, grid(be, m, n), ta, tw, bp, mode, c, m32, n32, k32, ldc as i64)
}

/// out [m, n] = x + gate[m / l] · (A [m, k] · W [n, k]ᵀ + bias), bf16 (gemm_mma_gated_bf16's
/// contract: x and out dense [m, n], gate rows `gs` apart).
#[allow(clippy::too_many_arguments)]
pub(super) fn gated_bf16(
    be: &CudaBackend,
    a: u64,
    w: u64,
    bias: u64,
    x: u64,
    gate: (u64, i64),
    l: i32,
    out: u64,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let ta = row_major_128b(a, TileElem::Bf16, m, k, 128)?;
    let tw = row_major_128b(w, TileElem::Bf16, n, k, 128)?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    launch!(be.dev, GATED_KERNEL, grid(be, m, n), ta, tw, bias, x, gate.0, gate.1, l, out, m32, n32, k32)
}

/// out [m, n] = codes [m, k] · W codes [n, k]ᵀ · a_scale[m] · w_scale[n] + bias (e4m3 codes,
/// gemm_w8a8_mma_e4m3's contract).
#[allow(clippy::too_many_arguments)]
pub(super) fn e4m3(
    be: &CudaBackend,
    codes: u64,
    a_scale: u64,
    w: u64,
    w_scale: u64,
    bias: u64,
    out: u64,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let ta = row_major_128b(codes, TileElem::E4m3, m, k, 128)?;
    let tw = row_major_128b(w, TileElem::E4m3, n, k, 128)?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    launch!(be.dev, E4M3_KERNEL, grid(be, m, n), ta, a_scale, tw, w_scale, bias, out, m32, n32, k32, n as i64)
}
