//! Launchers for the v3 GEMMs on Hopper (kernels/gemm_wgmma.cu): warp-specialised wgmma fed by
//! TMA, for sm_90a images only. `gemm` (bf16) and the FP8 W8A8 linear pick them where they apply,
//! unless `CudaBackend::set_gemm_v2` asks for the v2 kernels (mma.sync), their references.
//! Where whole 128x128 tiles would leave SMs idle (the M = 512 text-stream and text-encoder
//! shapes) the blocks split the tiles' K slices evenly instead (stream-K, `stream_k_blocks`);
//! where 128x256 tiles take fewer SM-waves' time than 128x128 ones (`wide_pays`) the `_wide`
//! kernels run instead.

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
/// The same with 128x256 tiles.
const WIDE_KERNELS: [&str; 4] =
    ["gemm_wgmma_bf16_wide", "gemm_wgmma_gated_bf16_wide", "gemm_wgmma_e4m3_wide", "gemm_wgmma_gated_e4m3_wide"];
/// The one image target with wgmma.
pub(super) const V3_TARGET: &str = "sm_90a";
/// Every v3 kernel (launched on sm_90a images only).
pub(super) const KERNELS: [&str; 8] = [
    BF16_KERNEL,
    GATED_KERNEL,
    E4M3_KERNEL,
    GATED_E4M3_KERNEL,
    WIDE_KERNELS[0],
    WIDE_KERNELS[1],
    WIDE_KERNELS[2],
    WIDE_KERNELS[3],
];

/// The kernels' dynamic shared memory (`WgCfg::SMEM`) for tiles `width` wide: 1 KB of alignment
/// slack, the stages (5 narrow, 3 wide) of a 128-row A and a `width`-row W slice of 128 bytes, 8
/// consumer warps' 16 x 136 bf16 epilogue buffers, and the stages' two mbarriers.
fn smem_bytes(width: usize) -> usize {
    let stages = if width == 128 { 5 } else { 3 };
    1024 + stages * (128 + width) * 128 + 8 * 16 * 136 * 2 + 2 * stages * 8
}

/// The kernels needing the opt-in shared-memory attribute, for images that have them running.
pub(super) fn big_smem(target: &str) -> Vec<(&'static str, usize)> {
    if target == V3_TARGET {
        KERNELS.iter().map(|&k| (k, smem_bytes(if WIDE_KERNELS.contains(&k) { 256 } else { 128 }))).collect()
    } else {
        Vec::new()
    }
}

/// A wide tile's assumed speed per product over a narrow one, in percent: the wide kernels stage
/// twice the products per byte of W. To be measured (docs/perf-log.md); until then, the reason
/// `wide_pays` wants a clear gain in waves.
const WIDE_GAIN_PCT: usize = 115;

/// Whether 128x256 tiles beat 128x128 ones for an `m` x `n` output on `sms` SMs: a wide tile
/// takes 2 / gain of a narrow one's time, and each kernel takes as many of its tiles' times as
/// it has waves of tiles (the persistent blocks' tail waves included).
pub(super) fn wide_pays(sms: usize, m: usize, n: usize) -> bool {
    let (sms, rows) = (sms.max(1), m.div_ceil(128));
    let narrow_waves = (rows * n.div_ceil(128)).div_ceil(sms);
    let wide_waves = (rows * n.div_ceil(256)).div_ceil(sms);
    wide_waves * 200 < narrow_waves * WIDE_GAIN_PCT
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

/// One GEMM's launch: the shape, stream-K's argument, and the tile width (128 or 256).
struct Plan {
    cfg: LaunchConfig,
    sk: StreamK,
    width: usize,
}

impl Plan {
    /// The kernel `narrow` names, or its wide twin.
    fn kernel(&self, narrow: &'static str) -> &'static str {
        match KERNELS[..4].iter().position(|&k| k == narrow) {
            Some(i) if self.width == 256 => WIDE_KERNELS[i],
            _ => narrow,
        }
    }

    /// The tensor map of W `[n, k]` for this plan's tiles.
    fn w_map(&self, w: u64, elem: TileElem, n: usize, k: usize) -> Result<super::tensor_map::TensorMap> {
        row_major_128b(w, elem, n, k, self.width as u32)
    }
}

/// The tiling of one GEMM of `m` x `n` with `k_bytes` bytes of K per row on this device: stream-K's
/// block count (narrow tiles), or None for whole tiles; and whether they are wide.
pub(super) fn tiling(be: &CudaBackend, m: usize, n: usize, k_bytes: usize) -> (Option<usize>, bool) {
    if be.dev.gemm_wide.load(Ordering::Relaxed) {
        return (None, true);
    }
    let split = split(be, m, n, k_bytes);
    let narrow = be.dev.gemm_narrow.load(Ordering::Relaxed);
    (split, split.is_none() && !narrow && wide_pays(be.persistent_sms(), m, n))
}

/// The launch of one GEMM of `m` x `n` with `k_bytes` bytes of K per row: persistent blocks, one
/// per SM (at most one per tile) walking whole tiles, narrow or wide, or stream-K on narrow ones.
fn plan(be: &CudaBackend, m: usize, n: usize, k_bytes: usize) -> Result<Plan> {
    let sms = be.persistent_sms();
    let (split, wide) = tiling(be, m, n, k_bytes);
    let width = if wide { 256 } else { 128 };
    let tiles = m.div_ceil(128) * n.div_ceil(width);
    let (blocks, sk) = match split {
        None => (tiles.min(sms), StreamK::default()),
        Some(blocks) => {
            let (partials, counts) = stream_k_buffers(be, blocks, tiles)?;
            (blocks, StreamK { partials, counts, units: (tiles * k_bytes.div_ceil(SLICE_BYTES)) as i64 })
        }
    };
    let shared_mem_bytes = smem_bytes(width) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (384, 1, 1), shared_mem_bytes };
    Ok(Plan { cfg, sk, width })
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
    let p = plan(be, m, n, k * 2)?;
    let ta = row_major_128b(a, TileElem::Bf16, m, k, 128)?;
    let tw = p.w_map(w, TileElem::Bf16, n, k)?;
    let (bp, mode) = bias.args();
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    launch!(be.dev, p.kernel(BF16_KERNEL), p.cfg, ta, tw, bp, mode, c, m32, n32, k32, ldc as i64, p.sk)
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
    let p = plan(be, m, n, k * 2)?;
    let ta = row_major_128b(a, TileElem::Bf16, m, k, 128)?;
    let tw = p.w_map(w, TileElem::Bf16, n, k)?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    launch!(be.dev, p.kernel(GATED_KERNEL), p.cfg, ta, tw, bias, x, gp, gs, l, out, m32, n32, k32, p.sk)
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
    let p = plan(be, m, n, k)?;
    let ta = row_major_128b(codes, TileElem::E4m3, m, k, 128)?;
    let tw = p.w_map(w, TileElem::E4m3, n, k)?;
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    let (cfg, sk) = (p.cfg, p.sk);
    match gated {
        None => launch!(
            be.dev,
            p.kernel(E4M3_KERNEL),
            cfg,
            ta,
            a_scale,
            tw,
            w_scale,
            bias,
            out,
            m32,
            n32,
            k32,
            n as i64,
            sk
        ),
        Some(GatedArgs { x, gate: (gp, gs), l }) => {
            launch!(
                be.dev,
                p.kernel(GATED_E4M3_KERNEL),
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
    use super::{smem_bytes, stream_k_blocks, wide_pays};

    #[test]
    fn wide_tiles_where_they_take_fewer_waves() {
        // klein-4B's image stream on 132 SMs (M 4608; N 3072, 9216, 27648) and its double block's (M 4096):
        // 7 narrow waves against 4 wide ones (4 x 2 / 1.15 < 7), 20 against 10, 59 against 30, 6 against 3.
        for (m, n) in [(4608, 3072), (4608, 9216), (4608, 27648), (4096, 3072)] {
            assert!(wide_pays(132, m, n), "{m} x {n}");
        }
        // 2 narrow waves against 1 wide one (1.74 narrow tiles' time).
        assert!(wide_pays(132, 128 * 132, 256));
        // Tiles for half the SMs either way; a single 128-column tile; 3 narrow waves against 2 wide
        // ones half of whose second column of tiles is padding (3.5 narrow tiles' time).
        assert!(!wide_pays(132, 512, 1024));
        assert!(!wide_pays(132, 4608, 128));
        assert!(!wide_pays(132, 128 * 132, 384));
        // Shared memory: narrow 5 stages of 32 KB, wide 3 of 48 KB; both under the 227 KB a block may opt into.
        assert_eq!(smem_bytes(128), 1024 + 5 * 32768 + 34816 + 80);
        assert_eq!(smem_bytes(256), 1024 + 3 * 49152 + 34816 + 48);
        assert!(smem_bytes(128).max(smem_bytes(256)) <= 227 * 1024);
    }

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
