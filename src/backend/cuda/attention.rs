//! Launchers for the attention kernels (kernels/attention.cu): the tensor-core flash kernel for
//! head dims 64 and 128, the row-wise kernel for every other head dim (up to 1024).

use cudarc::driver::LaunchConfig;

use super::{launch, CudaBackend};
use crate::backend::{check, AttnMask};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Dynamic shared memory of the flash kernel: Q, K and V tiles of 64 rows, padded by 8.
pub(super) fn flash_smem_bytes(d: usize) -> usize {
    3 * 64 * (d + 8) * 2
}

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
    // The flash kernels copy 16-byte chunks of each row (rows are 128 or 256 bytes apart), so the
    // views must start 16-byte aligned; a view that does not (an odd offset) takes the row-wise kernel.
    let aligned = qp % 16 == 0 && kp % 16 == 0 && vp % 16 == 0;
    let flash = match d {
        64 if aligned => Some("flash_attention_d64_bf16"),
        128 if aligned => Some("flash_attention_d128_bf16"),
        _ => None,
    };
    if let Some(name) = flash {
        if h > 65535 || b > 65535 {
            return Err(Error::shape("attention", format!("{h} heads x {b} batch exceed one grid")));
        }
        let cfg = LaunchConfig {
            grid_dim: (nq.div_ceil(64) as u32, h as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: flash_smem_bytes(d) as u32,
        };
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        launch!(be.dev, name, cfg, qp, kp, vp, op, nq as i32, nk as i32, h as i32, hkv as i32, scale_log2, causal, lp)?;
    } else {
        if d > 1024 {
            return Err(Error::shape("attention", format!("head dim {d} is above the GPU limit of 1024")));
        }
        let rows = b * nq * h;
        let cfg =
            LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(
            be.dev,
            "attention_rowwise_bf16",
            cfg,
            qp,
            kp,
            vp,
            op,
            b as i32,
            nq as i32,
            nk as i32,
            h as i32,
            hkv as i32,
            d as i32,
            scale,
            causal,
            lp
        )?;
    }
    Ok(out)
}
