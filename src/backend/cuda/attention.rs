//! Launchers for the attention kernels. Head dims 64 and 128: flash attention v4 without a mask on
//! sm_90a images (wgmma + TMA, attention_wgmma.rs), otherwise flash attention v3
//! (kernels/attention_v3.cu; 128-query blocks, double-buffered K/V, an unmasked and a masked
//! instantiation). Head dims 256, 384 and 512 without a mask: the wide tensor-core kernel
//! (kernels/attention_wide.cu, the VAE's one 512-wide head). Everything else: the row-wise kernel
//! (kernels/attention.cu, any head dim up to 1024). The previous versions (flash v2 for 64/128, the
//! row-wise kernel for the wide heads) stay as references, chosen by
//! [`CudaBackend::set_reference_attention`](super::CudaBackend::set_reference_attention).

use cudarc::driver::LaunchConfig;

use std::sync::atomic::Ordering;

use super::e4m3_rows::E4m3Rows;
use super::{attention_wgmma, launch, CudaBackend};
use crate::backend::{check, AttnMask};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Dynamic shared memory of the flash v2 kernel: Q, K and V tiles of 64 rows, padded by 8.
pub(super) fn flash_smem_bytes(d: usize) -> usize {
    3 * 64 * (d + 8) * 2
}

/// Query rows per block of flash attention v3 (8 warps of 16 rows).
const V3_BLOCK_Q: usize = 128;

/// Dynamic shared memory of flash attention v3: two stages of K and V tiles (64 keys at d = 64,
/// 32 at d = 128), rows padded by 8 (`V3Cfg` in kernels/attention_v3.cu).
pub(super) fn v3_smem_bytes(d: usize) -> usize {
    let keys = if d == 64 { 64 } else { 32 };
    2 * 2 * keys * (d + 8) * 2
}

/// (query rows per block, threads, dynamic shared memory) of the wide kernel for head dim `d`
/// (`WideCfg` in kernels/attention_wide.cu): d/128 warps per 16 query rows, 32-key K and V
/// tiles, f32 partial scores of 40 floats a row per warp of a row group.
pub(super) fn wide_config(d: usize) -> (usize, usize, usize) {
    let slices = d / 128;
    let groups = if slices == 2 { 4 } else { 2 };
    let rows = 16 * groups;
    let smem = 2 * 32 * (d + 8) * 2 + slices * rows * 40 * 4;
    (rows, 32 * groups * slices, smem)
}

/// The wide kernels by head dim.
pub(super) const WIDE_KERNELS: [(usize, &str); 3] = [
    (256, "flash_attention_wide_d256_bf16"),
    (384, "flash_attention_wide_d384_bf16"),
    (512, "flash_attention_wide_d512_bf16"),
];

/// The kernels' mask arguments: causal flag, the padding lengths on the device (kept alive by the
/// caller until the launch is queued) and their address (0 without padding).
pub(super) fn mask_args(be: &CudaBackend, mask: &AttnMask) -> Result<(i32, Option<Tensor>, u64)> {
    let (causal, lens) = match mask {
        AttnMask::None => (0, None),
        AttnMask::Causal { valid_len } => (1, valid_len.as_ref()),
    };
    let lens = lens
        .map(|l| {
            let l: Vec<i32> = l.iter().map(|&x| x as i32).collect();
            be.upload_bytes(bytemuck::cast_slice(&l), DType::F32, &[l.len()]) // 4-byte ints
        })
        .transpose()?;
    let ptr = lens.as_ref().map(|t| be.ptr(t)).transpose()?.unwrap_or(0);
    Ok((causal, lens, ptr))
}

/// The kernel an attention call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    FlashV3(&'static str),
    FlashV2(&'static str),
    Wide(&'static str),
    Rowwise,
}

fn path(d: usize, masked: bool, aligned: bool, reference: bool) -> Path {
    if !aligned {
        return Path::Rowwise;
    }
    match (d, masked, reference) {
        (64, false, false) => Path::FlashV3("flash_attention_v3_d64_bf16"),
        (64, true, false) => Path::FlashV3("flash_attention_v3_d64_masked_bf16"),
        (128, false, false) => Path::FlashV3("flash_attention_v3_d128_bf16"),
        (128, true, false) => Path::FlashV3("flash_attention_v3_d128_masked_bf16"),
        (64, _, true) => Path::FlashV2("flash_attention_d64_bf16"),
        (128, _, true) => Path::FlashV2("flash_attention_d128_bf16"),
        (_, false, false) => {
            WIDE_KERNELS.iter().find(|(wd, _)| *wd == d).map_or(Path::Rowwise, |(_, name)| Path::Wide(name))
        }
        _ => Path::Rowwise,
    }
}

/// The flash v3 kernels that also write the output's e4m3 rows (e4m3_rows.rs), by head dim.
const V3_E4M3_OUT_KERNELS: [(usize, &str); 2] =
    [(64, "flash_attention_v3_e4m3out_d64_bf16"), (128, "flash_attention_v3_e4m3out_d128_bf16")];

/// Unmasked attention whose kernel also writes the output's e4m3 rows into `rows` (made for
/// `[b, nq, h·d]`): flash v4 where it applies, else v3, at head dims 64 and 128 with 16-byte
/// aligned operands; None where neither runs (the caller composes).
pub(super) fn attention_rows(
    be: &CudaBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    rows: &E4m3Rows,
) -> Result<Option<Tensor>> {
    let dims = check::attention(q, k, v, &AttnMask::None)?;
    let [b, nq, h, nk, hkv, d] = dims;
    let Some(&(_, v3)) = V3_E4M3_OUT_KERNELS.iter().find(|(kd, _)| *kd == d) else { return Ok(None) };
    if nq == 0 || h > 65535 || b > 65535 || be.dev.reference_attention.load(Ordering::Relaxed) {
        return Ok(None);
    }
    rows.check(b, nq, h * d)?;
    let (_q, qp) = be.bf16_arg(q, "attention")?;
    let (_k, kp) = be.bf16_arg(k, "attention")?;
    let (_v, vp) = be.bf16_arg(v, "attention")?;
    if (qp | kp | vp) % 16 != 0 {
        return Ok(None);
    }
    let out = be.output(DType::BF16, &[b, nq, h, d])?;
    let op = be.ptr(&out)?;
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    if let Some(name) = attention_wgmma::kernel(be, false, dims) {
        attention_wgmma::flash_v4(be, name, (qp, kp, vp, op), dims, scale_log2, Some(rows))?;
        return Ok(Some(out));
    }
    let cfg = LaunchConfig {
        grid_dim: E4m3Rows::grid(Some(rows), nq.div_ceil(V3_BLOCK_Q), h, b),
        block_dim: (256, 1, 1),
        shared_mem_bytes: v3_smem_bytes(d) as u32,
    };
    let (nq32, nk32, h32, hkv32) = (nq as i32, nk as i32, h as i32, hkv as i32);
    launch!(be.dev, v3, cfg, qp, kp, vp, op, nq32, nk32, h32, hkv32, scale_log2, 0i32, 0u64, rows.arg(be)?)?;
    Ok(Some(out))
}

pub(super) fn attention(
    be: &CudaBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f32,
) -> Result<Tensor> {
    let [b, nq, h, nk, hkv, d] = check::attention(q, k, v, mask)?;
    let (_q, qp) = be.bf16_arg(q, "attention")?;
    let (_k, kp) = be.bf16_arg(k, "attention")?;
    let (_v, vp) = be.bf16_arg(v, "attention")?;
    let out = be.output(DType::BF16, &[b, nq, h, d])?;
    let (causal, _lens, lp) = mask_args(be, mask)?;
    let op = be.ptr(&out)?;
    if nq == 0 {
        return Ok(out);
    }
    // The tensor-core kernels copy 16-byte chunks of each row (rows are at least 128 bytes apart),
    // so the views must start 16-byte aligned; a view that does not (an odd offset) takes the
    // row-wise kernel.
    let aligned = qp % 16 == 0 && kp % 16 == 0 && vp % 16 == 0;
    let masked = !matches!(mask, AttnMask::None);
    let path = path(d, masked, aligned, be.dev.reference_attention.load(Ordering::Relaxed));
    if path != Path::Rowwise && (h > 65535 || b > 65535) {
        return Err(Error::shape("attention", format!("{h} heads x {b} batch exceed one grid")));
    }
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    if matches!(path, Path::FlashV3(_)) {
        if let Some(name) = attention_wgmma::kernel(be, masked, [b, nq, h, nk, hkv, d]) {
            attention_wgmma::flash_v4(be, name, (qp, kp, vp, op), [b, nq, h, nk, hkv, d], scale_log2, None)?;
            return Ok(out);
        }
    }
    let (nq32, nk32, h32, hkv32) = (nq as i32, nk as i32, h as i32, hkv as i32);
    match path {
        Path::FlashV3(name) | Path::FlashV2(name) => {
            let (rows, threads, smem) = match path {
                Path::FlashV3(_) => (V3_BLOCK_Q, 256, v3_smem_bytes(d)),
                _ => (64, 128, flash_smem_bytes(d)),
            };
            let cfg = LaunchConfig {
                grid_dim: (nq.div_ceil(rows) as u32, h as u32, b as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            launch!(be.dev, name, cfg, qp, kp, vp, op, nq32, nk32, h32, hkv32, scale_log2, causal, lp)?;
        }
        Path::Wide(name) => {
            let (rows, threads, smem) = wide_config(d);
            let cfg = LaunchConfig {
                grid_dim: (nq.div_ceil(rows) as u32, h as u32, b as u32),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            launch!(be.dev, name, cfg, qp, kp, vp, op, nq32, nk32, h32, hkv32, scale_log2)?;
        }
        Path::Rowwise => {
            if d > 1024 {
                return Err(Error::shape("attention", format!("head dim {d} is above the GPU limit of 1024")));
            }
            let rows = b * nq * h;
            let cfg = super::warp_per_row(rows);
            launch!(
                be.dev,
                "attention_rowwise_bf16",
                cfg,
                qp,
                kp,
                vp,
                op,
                b as i32,
                nq32,
                nk32,
                h32,
                hkv32,
                d as i32,
                scale,
                causal,
                lp
            )?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        assert_eq!(path(64, false, true, false), Path::FlashV3("flash_attention_v3_d64_bf16"));
        assert_eq!(path(128, true, true, false), Path::FlashV3("flash_attention_v3_d128_masked_bf16"));
        assert_eq!(path(128, true, true, true), Path::FlashV2("flash_attention_d128_bf16"));
        assert_eq!(path(512, false, true, false), Path::Wide("flash_attention_wide_d512_bf16"));
        assert_eq!(path(384, false, true, false), Path::Wide("flash_attention_wide_d384_bf16"));
        // Masks, the reference switch, other head dims and misaligned views: the row-wise kernel.
        assert_eq!(path(512, true, true, false), Path::Rowwise);
        assert_eq!(path(512, false, true, true), Path::Rowwise);
        assert_eq!(path(640, false, true, false), Path::Rowwise);
        assert_eq!(path(96, false, true, false), Path::Rowwise);
        assert_eq!(path(64, false, false, false), Path::Rowwise);
    }

    #[test]
    fn budgets_match_the_kernels_comments() {
        assert_eq!(wide_config(512), (32, 256, 87_040));
        assert_eq!(wide_config(384), (32, 192, 65_536));
        assert_eq!(wide_config(256), (64, 256, 54_272));
        assert_eq!(v3_smem_bytes(64), 36_864);
        assert_eq!(v3_smem_bytes(128), 34_816);
    }
}
