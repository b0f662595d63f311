//! Concatenation (dense copies of strided blocks).

use super::{dense, output};
use crate::backend::check;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::{CpuStorage, Storage, Tensor};

pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let shape = check::concat(xs, dim)?;
    if let Some(stored) = concat_rows_as_stored(xs, dim, &shape) {
        return stored;
    }
    let first = xs[0];
    let outer: usize = first.shape()[..dim].iter().product();
    let inner: usize = first.shape()[dim + 1..].iter().product();
    let total = shape[dim];
    let parts: Vec<_> = xs.iter().map(|x| dense("concat", x)).collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (x, p) in xs.iter().zip(&parts) {
            let block = x.dim(dim) * inner;
            out.extend_from_slice(&p[o * block..(o + 1) * block]);
        }
    }
    output(out, &shape)
}

/// Row concatenation of weights kept in their stored dtype (bf16 precision's fused q/k/v and
/// gate/up projections): mapped pieces are listed, not copied; others are copied in their dtype
/// instead of widened to f32.
fn concat_rows_as_stored(xs: &[&Tensor], dim: usize, shape: &[usize]) -> Option<Result<Tensor>> {
    let dtype = xs[0].cpu_storage()?.dtype();
    if dim != 0 || dtype == DType::F32 {
        return None;
    }
    let size = dtype.size_in_bytes();
    // Mapped pieces stay where they are: the result lists them.
    let mut pieces = Vec::new();
    for x in xs {
        let range = (x.offset() * size, x.numel() * size);
        match x.cpu_storage()? {
            CpuStorage::Mapped(m, d) if *d == dtype && x.is_contiguous() => pieces.push(m.slice(range.0, range.1)?),
            _ => break,
        }
    }
    if pieces.len() == xs.len() {
        return Some(Tensor::from_storage(Storage::Cpu(CpuStorage::MappedRows(pieces, dtype)), shape));
    }
    let mut bytes = Vec::new();
    for x in xs {
        let storage = x.cpu_storage()?;
        if storage.dtype() != dtype || !x.is_contiguous() {
            return None;
        }
        bytes.extend_from_slice(&storage.raw_bytes()?[x.offset() * size..(x.offset() + x.numel()) * size]);
    }
    let storage = match dtype {
        DType::BF16 => {
            CpuStorage::BF16(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect())
        }
        DType::F16 => CpuStorage::F16(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect()),
        DType::F8E4M3 => CpuStorage::F8E4M3(bytes),
        _ => return None,
    };
    Some(Tensor::from_storage(Storage::Cpu(storage), shape))
}
