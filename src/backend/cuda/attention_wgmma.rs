//! Launcher of flash attention v4 on Hopper (kernels/attention_wgmma.cu): wgmma fed by TMA, for
//! unmasked heads of 64 and 128 on sm_90a images. Flash v3 (mma.sync) stays the reference and runs
//! everywhere else; `CudaBackend::set_flash_v3` (or `FLUX2_CUDA_ATTENTION=v3`) keeps it on sm_90a.

use std::sync::atomic::Ordering;

use cudarc::driver::LaunchConfig;

use super::e4m3_rows::E4m3Rows;
use super::gemm_wgmma::V3_TARGET;
use super::tensor_map::{row_major_128b, TileElem};
use super::{launch, CudaBackend};
use crate::dtype::DType;
use crate::error::Result;

pub(super) const D64_KERNEL: &str = "flash_attention_v4_d64_bf16";
pub(super) const D128_KERNEL: &str = "flash_attention_v4_d128_bf16";
const TRANSPOSE_KERNEL: &str = "transpose_v_bf16";
/// The kernels that also write the output's e4m3 rows (e4m3_rows.rs), by head dim.
pub(super) const E4M3_OUT_KERNELS: [(usize, &str); 2] =
    [(64, "flash_attention_v4_e4m3out_d64_bf16"), (128, "flash_attention_v4_e4m3out_d128_bf16")];
/// Every kernel of the module (launched on sm_90a images only).
pub(super) const KERNELS: [&str; 5] =
    [D64_KERNEL, D128_KERNEL, TRANSPOSE_KERNEL, E4M3_OUT_KERNELS[0].1, E4M3_OUT_KERNELS[1].1];

/// Keys per K/Vᵀ tile (`FaCfg::BKV`).
fn tile_keys(d: usize) -> usize {
    if d == 64 {
        128
    } else {
        64
    }
}

/// The kernels' dynamic shared memory (`FaCfg::SMEM`): 1 KB of alignment slack, Q (128 rows), three
/// stages of a K tile and a Vᵀ tile (4·d·keys bytes), and seven mbarriers.
pub(super) fn smem_bytes(d: usize) -> usize {
    1024 + 128 * d * 2 + 3 * 4 * d * tile_keys(d) + 7 * 8
}

/// The kernels needing the opt-in shared-memory attribute, for images that have them running.
pub(super) fn big_smem(target: &str) -> Vec<(&'static str, usize)> {
    if target == V3_TARGET {
        let plain = [(64, D64_KERNEL), (128, D128_KERNEL)];
        plain.into_iter().chain(E4M3_OUT_KERNELS).map(|(d, k)| (k, smem_bytes(d))).collect()
    } else {
        Vec::new()
    }
}

/// Whether the Hopper attention kernels (flash v4, Sage v3) can take a call `[b, nq, h, nk, hkv, d]`:
/// at least one batch, query and key (else nothing for a tensor map to describe; the older kernels
/// write the zeros), tensor-map coordinates within 32 bits, and a grid of batch x kv heads (v4's V
/// transpose) within 65535.
pub(super) fn tma_shapes_fit([b, nq, h, nk, hkv, d]: [usize; 6]) -> bool {
    let i32_ok = |x: usize| x < (1 << 31);
    b > 0
        && nq > 0
        && nk > 0
        && i32_ok((b + 1) * nq)
        && i32_ok((b + 1) * nk)
        && i32_ok(h * d)
        && b * hkv <= 65535
        && i32_ok((b * hkv + 1) * d)
}

/// The v4 kernel for an attention call `[b, nq, h, nk, hkv, d]`, if v4 applies: an sm_90a image,
/// v3 not requested, no mask, head dim 64 or 128, and shapes the tensor maps hold (`tma_shapes_fit`).
/// The caller has checked the 16-byte alignment the tensor maps need.
pub(super) fn kernel(be: &CudaBackend, masked: bool, dims: [usize; 6]) -> Option<&'static str> {
    let on = be.dev.target == V3_TARGET && !be.dev.flash_v3.load(Ordering::Relaxed) && !masked;
    match dims[5] {
        64 if on && tma_shapes_fit(dims) => Some(D64_KERNEL),
        128 if on && tma_shapes_fit(dims) => Some(D128_KERNEL),
        _ => None,
    }
}

/// out [b, nq, h, d] = softmax(q kᵀ · scale) v for dense q [b, nq, h, d], k and v [b, nk, hkv, d]:
/// Vᵀ first (zero-padded to a multiple of 32 keys), then the v4 kernel `name`; with `rows`, its
/// twin that also writes the output's e4m3 rows (grid heads first).
#[allow(clippy::too_many_arguments)]
pub(super) fn flash_v4(
    be: &CudaBackend,
    name: &'static str,
    (q, k, v, out): (u64, u64, u64, u64),
    [b, nq, h, nk, hkv, d]: [usize; 6],
    scale_log2: f32,
    rows: Option<&E4m3Rows>,
) -> Result<()> {
    let nk_pad = nk.div_ceil(32).max(1) * 32;
    let vt = be.output(DType::BF16, &[b * hkv * d * nk_pad])?;
    let vtp = be.ptr(&vt)?;
    let transpose = LaunchConfig {
        grid_dim: ((nk_pad / 32) as u32, (d / 32) as u32, (b * hkv) as u32),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    launch!(be.dev, TRANSPOSE_KERNEL, transpose, v, vtp, nk as i32, nk_pad as i32, hkv as i32, d as i32)?;
    let tq = row_major_128b(q, TileElem::Bf16, b * nq, h * d, 128)?;
    let tk = row_major_128b(k, TileElem::Bf16, b * nk, hkv * d, tile_keys(d) as u32)?;
    let tv = row_major_128b(vtp, TileElem::Bf16, b * hkv * d, nk_pad, d as u32)?;
    let cfg = LaunchConfig {
        grid_dim: E4m3Rows::grid(rows, nq.div_ceil(128), h, b),
        block_dim: (384, 1, 1),
        shared_mem_bytes: smem_bytes(d) as u32,
    };
    let (nq32, nk32, h32, hkv32) = (nq as i32, nk as i32, h as i32, hkv as i32);
    match rows {
        None => launch!(be.dev, name, cfg, tq, tk, tv, out, nq32, nk32, h32, hkv32, scale_log2),
        Some(r) => {
            let Some(&(_, name)) = E4M3_OUT_KERNELS.iter().find(|(kd, _)| *kd == d) else {
                return Err(crate::error::Error::Gpu(format!("no flash v4 kernel writes e4m3 rows at head dim {d}")));
            };
            let e = r.arg(be)?;
            launch!(be.dev, name, cfg, tq, tk, tv, out, nq32, nk32, h32, hkv32, scale_log2, e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernels_budget() {
        // kernels/attention_wgmma.cu's header: 130 KB at d = 128, 114 KB at d = 64; under the
        // 227 KB an H100 block may opt into.
        assert_eq!(smem_bytes(128), 1024 + 32768 + 3 * 32768 + 56);
        assert_eq!(smem_bytes(64), 1024 + 16384 + 3 * 32768 + 56);
        assert!(smem_bytes(128) <= 227 * 1024);
    }
}
