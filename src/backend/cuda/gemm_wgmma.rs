//! Launchers for the v3 GEMMs on Hopper (kernels/gemm_wgmma.cu): warp-specialised wgmma fed by
//! TMA, for sm_90a images only. `gemm` (bf16) and the FP8 W8A8 linear pick them where they apply,
//! unless `CudaBackend::set_gemm_v2` asks for the v2 kernels (mma.sync), their references.
//! Where whole 128x128 tiles would leave SMs idle (the M = 512 text-stream and text-encoder
//! shapes) the blocks split the tiles' K slices evenly instead (stream-K, `stream_k_blocks`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

use super::gemm::Bias;
use super::tensor_map::{row_major_128b, TileElem};
use super::{gpu_err, launch, CudaBackend};
use crate::error::{Error, Result};

pub(super) const BF16_KERNEL: &str = "gemm_wgmma_bf16";
pub(super) const GATED_KERNEL: &str = "gemm_wgmma_gated_bf16";
pub(super) const E4M3_KERNEL: &str = "gemm_wgmma_e4m3";
pub(super) const GATED_E4M3_KERNEL: &str = "gemm_wgmma_gated_e4m3";
/// The one image target with wgmma.
pub(super) const V3_TARGET: &str = "sm_90a";
/// Every v3 kernel (launched on sm_90a images only).
pub(super) const KERNELS: [&str; 4] = [BF16_KERNEL, GATED_KERNEL, E4M3_KERNEL, GATED_E4M3_KERNEL];

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

/// Bytes of K per slice (WG_KB): the unit of work stream-K splits.
const SLICE_BYTES: usize = 128;
/// Stream-K gives each block at least this many slices, so its two partial tiles' fix-up stays
/// small next to its share of the products.
const MIN_SLICES_PER_BLOCK: usize = 4;
/// A partial tile per consumer warp: 16 x 128 f32.
const WARP_PARTIAL_BYTES: usize = 16 * 128 * 4;

/// The kernels' `StreamK` argument (kernels/gemm_wgmma.cu); null pointers: whole tiles.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct StreamK {
    partials: u64,
    counts: u64,
    units: i64,
}
unsafe impl DeviceRepr for StreamK {}

/// Where stream-K pieces meet: each block's two partial-tile slots, and a counter per tile and
/// consumer warp (zero between launches: the warp completing a tile resets it). Grown on demand,
/// kept for the device's life; shared with the CUDA graphs that recorded kernels using them, so a
/// buffer replaced by a larger one stays alive until those graphs go.
#[derive(Default, Clone)]
pub(super) struct StreamKBuffers {
    partials: Option<Arc<CudaSlice<u8>>>,
    counts: Option<Arc<CudaSlice<u32>>>,
}

/// The number of blocks for stream-K on `sms` SMs, or None where whole tiles do as well: when the
/// last wave of tiles fills at least 80% of the SMs' time, or splitting would not shorten the
/// longest block's share by 15%.
pub(super) fn stream_k_blocks(sms: usize, tiles: usize, ktiles: usize) -> Option<usize> {
    let sms = sms.max(1);
    let waves = tiles.div_ceil(sms);
    if tiles == 0 || tiles * 5 >= waves * sms * 4 {
        return None;
    }
    let units = tiles * ktiles;
    let blocks = sms.min(units / MIN_SLICES_PER_BLOCK);
    let share = units.div_ceil(blocks.max(1));
    (blocks >= 2 && share * 100 <= waves * ktiles * 85).then_some(blocks)
}

/// Stream-K's block count for a GEMM of `m` x `n` with `k_bytes` bytes of K per row on this
/// device, or None where the blocks walk whole tiles.
pub(super) fn split(be: &CudaBackend, m: usize, n: usize, k_bytes: usize) -> Option<usize> {
    if be.dev.gemm_tiles.load(Ordering::Relaxed) {
        return None;
    }
    stream_k_blocks(be.persistent_sms(), m.div_ceil(128) * n.div_ceil(128), k_bytes.div_ceil(SLICE_BYTES))
}

/// The launch shape and stream-K argument of one GEMM of `m` x `n` with `k_bytes` bytes of K per
/// row: persistent blocks, one per SM (at most one per tile) walking whole tiles, or stream-K.
fn plan(be: &CudaBackend, m: usize, n: usize, k_bytes: usize) -> Result<(LaunchConfig, StreamK)> {
    let tiles = m.div_ceil(128) * n.div_ceil(128);
    let (blocks, sk) = match split(be, m, n, k_bytes) {
        None => (tiles.min(be.persistent_sms()), StreamK::default()),
        Some(blocks) => {
            let (partials, counts) = stream_k_buffers(be, blocks, tiles)?;
            (blocks, StreamK { partials, counts, units: (tiles * k_bytes.div_ceil(SLICE_BYTES)) as i64 })
        }
    };
    let cfg =
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (384, 1, 1), shared_mem_bytes: SMEM_BYTES as u32 };
    Ok((cfg, sk))
}

/// Device addresses of stream-K's partial slots for `blocks` blocks and counters for `tiles`.
fn stream_k_buffers(be: &CudaBackend, blocks: usize, tiles: usize) -> Result<(u64, u64)> {
    use cudarc::driver::DevicePtr;
    let dev = &be.dev;
    let mut bufs = dev.stream_k.lock().unwrap_or_else(|e| e.into_inner());
    let partial_bytes = blocks * 2 * 8 * WARP_PARTIAL_BYTES;
    let grow_partials = bufs.partials.as_ref().is_none_or(|p| p.len() < partial_bytes);
    let grow_counts = bufs.counts.as_ref().is_none_or(|c| c.len() < tiles * 8);
    if (grow_partials || grow_counts) && dev.capturing.load(Ordering::Relaxed) {
        // Memory allocated now would be the graph's, yet outlive it.
        return Err(Error::Gpu("stream-K's workspace would grow inside a CUDA graph capture".into()));
    }
    if grow_partials {
        let old = bufs.partials.take().map_or(0, |p| p.len());
        bufs.partials = Some(Arc::new(unsafe { dev.stream.alloc::<u8>(partial_bytes) }.map_err(gpu_err)?));
        dev.account(old, partial_bytes);
    }
    if grow_counts {
        let old = bufs.counts.take().map_or(0, |c| c.len() * 4);
        bufs.counts = Some(Arc::new(dev.stream.alloc_zeros::<u32>(tiles * 8).map_err(gpu_err)?));
        dev.account(old, tiles * 8 * 4);
    }
    let (Some(p), Some(c)) = (&bufs.partials, &bufs.counts) else { unreachable!("both buffers were just made") };
    let (pp, _) = p.device_ptr(&dev.stream);
    let (cp, _) = c.device_ptr(&dev.stream);
    Ok((pp, cp))
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
    let (cfg, sk) = plan(be, m, n, k * 2)?;
    launch!(be.dev, BF16_KERNEL, cfg, ta, tw, bp, mode, c, m32, n32, k32, ldc as i64, sk)
}

/// out [m, n] = x + gate[m / l] · (A [m, k] · W [n, k]ᵀ + bias), bf16 (gemm_mma_gated_bf16's
/// contract: x and out dense [m, n], gate rows `gs` apart).
pub(super) fn gated_bf16(
    be: &CudaBackend,
    a: u64,
    w: u64,
    bias: u64,
    GatedArgs { x, gate: (gp, gs), l }: GatedArgs,
    out: u64,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let ta = row_major_128b(a, TileElem::Bf16, m, k, 128)?;
    let tw = row_major_128b(w, TileElem::Bf16, n, k, 128)?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    let (cfg, sk) = plan(be, m, n, k * 2)?;
    launch!(be.dev, GATED_KERNEL, cfg, ta, tw, bias, x, gp, gs, l, out, m32, n32, k32, sk)
}

/// out [m, n] = codes [m, k] · W codes [n, k]ᵀ · a_scale[m] · w_scale[n] + bias (e4m3 codes,
/// gemm_w8a8_mma_e4m3's contract); with `gated`, out = x + gate[m / l] · that (the gated kernel).
#[allow(clippy::too_many_arguments)]
pub(super) fn e4m3(
    be: &CudaBackend,
    codes: u64,
    a_scale: u64,
    w: u64,
    w_scale: u64,
    bias: u64,
    out: u64,
    (m, n, k): (usize, usize, usize),
    gated: Option<GatedArgs>,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let ta = row_major_128b(codes, TileElem::E4m3, m, k, 128)?;
    let tw = row_major_128b(w, TileElem::E4m3, n, k, 128)?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    let (cfg, sk) = plan(be, m, n, k)?;
    match gated {
        None => launch!(be.dev, E4M3_KERNEL, cfg, ta, a_scale, tw, w_scale, bias, out, m32, n32, k32, n as i64, sk),
        Some(GatedArgs { x, gate: (gp, gs), l }) => {
            launch!(
                be.dev,
                GATED_E4M3_KERNEL,
                cfg,
                ta,
                a_scale,
                tw,
                w_scale,
                bias,
                x,
                gp,
                gs,
                l,
                out,
                m32,
                n32,
                k32,
                sk
            )
        }
    }
}

/// A gated-residual epilogue's operands: x (dense, the output's shape), the gate rows (address,
/// stride) and the tokens per sample.
#[derive(Clone, Copy)]
pub(super) struct GatedArgs {
    pub x: u64,
    pub gate: (u64, i64),
    pub l: i32,
}

#[cfg(test)]
mod tests {
    use super::stream_k_blocks;

    #[test]
    fn stream_k_where_whole_tiles_leave_sms_idle() {
        // klein's M = 512 text stream on 132 SMs: 96 tiles (N 3072) and 288 (N 9216) fill 73%.
        assert_eq!(stream_k_blocks(132, 96, 48), Some(132));
        assert_eq!(stream_k_blocks(132, 288, 24), Some(132));
        // M = 4608 image stream: 7 waves of 864 tiles fill 94%; whole SM multiples need nothing.
        assert_eq!(stream_k_blocks(132, 864, 48), None);
        assert_eq!(stream_k_blocks(132, 264, 48), None);
        // Too little K to split: each block would get fewer than 4 slices.
        assert_eq!(stream_k_blocks(132, 1, 2), None);
        // 6 tiles of 12 slices: 18 blocks of 4 slices, a third of a tile's time.
        assert_eq!(stream_k_blocks(132, 6, 12), Some(18));
    }
}
