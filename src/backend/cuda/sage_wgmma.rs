//! Launcher of Sage attention v3 on Hopper (kernels/attention_sage_wgmma.cu): int8 Q·Kᵀ and e4m3
//! P·V on wgmma, fed by TMA, for unmasked heads of 128 on sm_90a images. It takes v2's pre-pass
//! outputs (sage.rs); v2 (mma.sync) stays the reference and runs everywhere else;
//! `CudaBackend::set_sage_v2` (or `FLUX2_CUDA_SAGE=v2`) keeps it on sm_90a.

use std::sync::atomic::Ordering;

use cudarc::driver::LaunchConfig;

use super::e4m3_rows::E4m3Rows;
use super::gemm_wgmma::V3_TARGET;
use super::tensor_map::{row_major_128b, row_major_swizzled, Swizzle, TileElem};
use super::{launch, CudaBackend};
use crate::error::Result;

pub(super) const KERNEL: &str = "attention_sage_wgmma_d128";
/// The same, also writing the output's e4m3 rows (e4m3_rows.rs).
const KERNEL_E4M3_OUT: &str = "attention_sage_wgmma_e4m3out_d128";
/// Every kernel of the module (launched on sm_90a images only).
pub(super) const KERNELS: [&str; 2] = [KERNEL, KERNEL_E4M3_OUT];

/// Head dim, queries per block, keys per tile and stages of the kernel (`SW_*`).
const D: usize = 128;
const BLOCK_Q: usize = 128;
const TILE_KEYS: usize = 64;
const STAGES: usize = 4;

/// The kernel's dynamic shared memory: 1 KB of alignment slack, Q's codes (128 rows of 128 bytes),
/// the stages of K's (64 x 128) and Vᵀ's (128 x 64) codes, and 1 + 2·STAGES mbarriers.
pub(super) fn smem_bytes() -> usize {
    1024 + BLOCK_Q * D + STAGES * 2 * TILE_KEYS * D + (1 + 2 * STAGES) * 8
}

/// The kernels needing the opt-in shared-memory attribute, for images that have them running.
pub(super) fn big_smem(target: &str) -> Vec<(&'static str, usize)> {
    if target == V3_TARGET {
        KERNELS.iter().map(|&k| (k, smem_bytes())).collect()
    } else {
        Vec::new()
    }
}

/// Whether v3 runs a Sage call `[b, nq, h, nk, hkv, d]`: an sm_90a image, v2 not requested, no
/// mask, P·V on e4m3 (not forced to bf16), head dim 128, and shapes the tensor maps hold (flash v4's
/// `tma_shapes_fit`).
pub(super) fn applies(be: &CudaBackend, masked: bool, e4m3_pv: bool, dims: [usize; 6]) -> bool {
    let on = be.dev.target == V3_TARGET && !be.dev.sage_v2.load(Ordering::Relaxed) && !masked && e4m3_pv;
    on && dims[5] == D && super::attention_wgmma::tma_shapes_fit(dims)
}

/// Device pointers of one call: Q's and K's int8 codes `[b, n, heads, 128]`, Vᵀ's e4m3 codes
/// `[b·hkv, 128, nk_pad]`, the output; Q's and K's block maxima, V's channel means and maxima.
pub(super) struct SageArgs {
    pub q: u64,
    pub k: u64,
    pub vt: u64,
    pub out: u64,
    pub q_absmax: u64,
    pub k_absmax: u64,
    pub v_mean: u64,
    pub v_absmax: u64,
}

/// The launch; with `rows`, the kernel that also writes the output's e4m3 rows (grid heads first).
pub(super) fn sage_v3(
    be: &CudaBackend,
    a: &SageArgs,
    [b, nq, h, nk, hkv, _]: [usize; 6],
    nk_pad: usize,
    scale: f32,
    rows: Option<&E4m3Rows>,
) -> Result<()> {
    let tq = row_major_128b(a.q, TileElem::E4m3, b * nq, h * D, BLOCK_Q as u32)?;
    let tk = row_major_128b(a.k, TileElem::E4m3, b * nk, hkv * D, TILE_KEYS as u32)?;
    let tv = row_major_swizzled(a.vt, TileElem::E4m3, b * hkv * D, nk_pad, D as u32, Swizzle::B64)?;
    let cfg = LaunchConfig {
        grid_dim: E4m3Rows::grid(rows, nq.div_ceil(BLOCK_Q), h, b),
        block_dim: (384, 1, 1),
        shared_mem_bytes: smem_bytes() as u32,
    };
    let (nq32, nk32, h32, hkv32) = (nq as i32, nk as i32, h as i32, hkv as i32);
    let (qa, ka, vm, va) = (a.q_absmax, a.k_absmax, a.v_mean, a.v_absmax);
    match rows {
        None => launch!(be.dev, KERNEL, cfg, tq, tk, tv, a.out, nq32, nk32, h32, hkv32, scale, qa, ka, vm, va),
        Some(r) => {
            let e = r.arg(be)?;
            launch!(be.dev, KERNEL_E4M3_OUT, cfg, tq, tk, tv, a.out, nq32, nk32, h32, hkv32, scale, qa, ka, vm, va, e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_matches_the_kernels_budget() {
        // kernels/attention_sage_wgmma.cu's header: 81 KB, under the 227 KB an H100 block may opt into.
        assert_eq!(smem_bytes(), 1024 + 16384 + 4 * 16384 + 72);
        assert!(smem_bytes() <= 227 * 1024);
    }
}
