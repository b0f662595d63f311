//! The tensor type: shared storage plus a strided view (shape, strides, offset in elements).
//!
//! View operations (reshape, narrow, chunk, permute) never copy; ops that need dense input
//! materialise it through their backend. Storage lives on one device: host memory for the CPU
//! reference backend, device memory for the CUDA backend.

use std::sync::Arc;

use half::{bf16, f16};

use crate::dtype::{f8e4m3_to_f32, DType};
use crate::error::{Error, Result};

/// Host storage of the CPU backend.
#[derive(Debug, Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    F8E4M3(Vec<u8>),
    /// Raw bytes: the codes of a weight-only quantized weight (`QuantTensor::data`), read by the
    /// mixed GEMM through `Weights::of_quantized`.
    U8(Vec<u8>),
    /// Elements of `dtype` left in a checkpoint's memory map (the CPU backend's bf16 precision
    /// keeps weights there; kernels convert them while packing).
    Mapped(crate::weights::mapping::MappedBytes, DType),
    /// A row concatenation of mapped pieces (a fused q/k/v or gate/up projection whose parts are
    /// separate tensors in the file), still without a copy.
    MappedRows(Vec<crate::weights::mapping::MappedBytes>, DType),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::F8E4M3(_) => DType::F8E4M3,
            CpuStorage::U8(_) => DType::U8,
            CpuStorage::Mapped(_, dtype) | CpuStorage::MappedRows(_, dtype) => *dtype,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::F8E4M3(v) | CpuStorage::U8(v) => v.len(),
            CpuStorage::Mapped(m, dtype) => m.len() / dtype.size_in_bytes(),
            CpuStorage::MappedRows(pieces, dtype) => {
                pieces.iter().map(|p| p.len()).sum::<usize>() / dtype.size_in_bytes()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f32.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            CpuStorage::F32(v) => v[i],
            CpuStorage::BF16(v) => v[i].to_f32(),
            CpuStorage::F16(v) => v[i].to_f32(),
            CpuStorage::F8E4M3(v) => f8e4m3_to_f32(v[i]),
            CpuStorage::U8(v) => v[i] as f32,
            CpuStorage::Mapped(m, dtype) => {
                let size = dtype.size_in_bytes();
                crate::dtype::decode_to_f32(&m.bytes()[i * size..(i + 1) * size], *dtype)[0]
            }
            CpuStorage::MappedRows(pieces, dtype) => {
                let size = dtype.size_in_bytes();
                let mut at = i * size;
                for p in pieces {
                    if at < p.len() {
                        return crate::dtype::decode_to_f32(&p.bytes()[at..at + size], *dtype)[0];
                    }
                    at -= p.len();
                }
                panic!("element {i} is past the end of the storage")
            }
        }
    }

    /// The raw little-endian bytes of a non-f32 storage (what the mixed-precision kernels read).
    pub fn raw_bytes(&self) -> Option<&[u8]> {
        match self {
            CpuStorage::F32(_) => None,
            CpuStorage::BF16(v) => Some(bytemuck::cast_slice(v)),
            CpuStorage::F16(v) => Some(bytemuck::cast_slice(v)),
            CpuStorage::F8E4M3(v) | CpuStorage::U8(v) => Some(v),
            CpuStorage::Mapped(m, _) => Some(m.bytes()),
            // Not one slice: readers go element by element (`get_f32`) or piece by piece.
            CpuStorage::MappedRows(..) => None,
        }
    }

    /// Bytes this storage holds in anonymous (heap) memory; mapped weights hold none.
    pub fn heap_bytes(&self) -> usize {
        match self {
            CpuStorage::Mapped(..) | CpuStorage::MappedRows(..) => 0,
            s => s.len() * s.dtype().size_in_bytes(),
        }
    }
}

/// Where a tensor's storage lives.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::CudaStorage),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.dtype(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Strides that let `new_shape` alias the elements of a (shape, strides) view, if any exist
/// (the algorithm of PyTorch's `computeStride`: group old dims into dense chunks, then split
/// each chunk into the new dims that cover it).
fn view_strides(shape: &[usize], strides: &[usize], new_shape: &[usize]) -> Option<Vec<usize>> {
    let mut new_strides = vec![0usize; new_shape.len()];
    let mut view_d = new_shape.len() as isize - 1;
    let mut chunk_base_stride = *strides.last()?;
    let mut tensor_numel = 1usize;
    let mut view_numel = 1usize;
    for tensor_d in (0..shape.len()).rev() {
        tensor_numel *= shape[tensor_d];
        let chunk_ends =
            tensor_d == 0 || (shape[tensor_d - 1] != 1 && strides[tensor_d - 1] != tensor_numel * chunk_base_stride);
        if chunk_ends {
            while view_d >= 0 && (view_numel < tensor_numel || new_shape[view_d as usize] == 1) {
                new_strides[view_d as usize] = view_numel * chunk_base_stride;
                view_numel *= new_shape[view_d as usize];
                view_d -= 1;
            }
            if view_numel != tensor_numel {
                return None;
            }
            if tensor_d > 0 {
                chunk_base_stride = strides[tensor_d - 1];
                tensor_numel = 1;
                view_numel = 1;
            }
        }
    }
    if view_d != -1 {
        return None;
    }
    Some(new_strides)
}

impl Tensor {
    /// A dense tensor over `storage`, which must hold exactly `shape.product()` elements.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let len = match &storage {
            Storage::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        };
        if len != numel {
            return Err(Error::shape("from_storage", format!("{len} elements cannot have shape {shape:?}")));
        }
        Ok(Tensor { storage: Arc::new(storage), shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 })
    }

    /// A CPU f32 tensor.
    pub fn from_f32(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_storage(Storage::Cpu(CpuStorage::F32(data)), shape)
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }

    /// Size of the last dimension.
    pub fn last_dim(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn device(&self) -> DeviceKind {
        match &*self.storage {
            Storage::Cpu(_) => DeviceKind::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// Dense row-major layout starting anywhere in the storage.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// Number of rows when the last dimension is taken as the row.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }

    /// Row stride (elements) of a view whose last dim is contiguous and whose rows are evenly
    /// spaced, e.g. a `narrow` of the last dim of a dense tensor (axes of size 1 have any stride);
    /// None otherwise. Kernels that take such rows read the view in place.
    pub fn row_stride(&self) -> Option<usize> {
        let (shape, strides) = (&self.shape, &self.strides);
        let r = shape.len();
        if r == 0 || (strides[r - 1] != 1 && shape[r - 1] > 1) {
            return None;
        }
        let (mut ld, mut expected) = (shape[r - 1], None::<usize>);
        for d in (0..r - 1).rev().filter(|&d| shape[d] > 1) {
            match expected {
                None => ld = strides[d],
                Some(e) if e != strides[d] => return None,
                Some(_) => {}
            }
            expected = Some(strides[d] * shape[d]);
        }
        Some(ld)
    }

    /// Same data, new shape, without copying (torch's `view` rule): works for contiguous tensors
    /// and for strided views whose reshaped dimensions stay dense (e.g. splitting the last dim of
    /// a column slice into heads). Otherwise make the tensor contiguous first.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(Error::shape("reshape", format!("cannot reshape {:?} to {shape:?}", self.shape)));
        }
        let strides = if self.is_contiguous() {
            Some(contiguous_strides(shape))
        } else {
            view_strides(&self.shape, &self.strides, shape)
        };
        let strides = strides.ok_or_else(|| {
            Error::shape(
                "reshape",
                format!("strided view {:?} cannot be viewed as {shape:?}; make it contiguous first", self.shape),
            )
        })?;
        Ok(Tensor { storage: self.storage.clone(), shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// View of `len` entries of dimension `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(Error::shape(
                "narrow",
                format!("range {start}..{} of dim {dim} out of bounds for {:?}", start + len, self.shape),
            ));
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        Ok(Tensor {
            storage: self.storage.clone(),
            shape,
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        })
    }

    /// Split dimension `dim` into `n` equal views (torch.chunk with an exact split).
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        let size =
            *self.shape.get(dim).ok_or_else(|| Error::shape("chunk", format!("no dim {dim} in {:?}", self.shape)))?;
        if n == 0 || size % n != 0 {
            return Err(Error::shape(
                "chunk",
                format!("dim {dim} of {:?} does not split into {n} equal parts", self.shape),
            ));
        }
        let part = size / n;
        (0..n).map(|i| self.narrow(dim, i * part, part)).collect()
    }

    /// Split dimension `dim` into consecutive views of the given sizes.
    pub fn split(&self, sizes: &[usize], dim: usize) -> Result<Vec<Tensor>> {
        if sizes.iter().sum::<usize>() != self.shape[dim] {
            return Err(Error::shape(
                "split",
                format!("sizes {sizes:?} do not add up to dim {dim} of {:?}", self.shape),
            ));
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &s in sizes {
            out.push(self.narrow(dim, start, s)?);
            start += s;
        }
        Ok(out)
    }

    /// Reorder dimensions (a view).
    pub fn permute(&self, order: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        if order.len() != self.rank()
            || order.iter().any(|&d| d >= self.rank() || std::mem::replace(&mut seen[d], true))
        {
            return Err(Error::shape(
                "permute",
                format!("{order:?} is not a permutation of the dims of {:?}", self.shape),
            ));
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: order.iter().map(|&d| self.shape[d]).collect(),
            strides: order.iter().map(|&d| self.strides[d]).collect(),
            offset: self.offset,
        })
    }

    /// A view with explicit offset, shape and strides over this tensor's storage (bounds-checked).
    pub fn as_strided(&self, offset: usize, shape: &[usize], strides: &[usize]) -> Result<Tensor> {
        let len = match &*self.storage {
            Storage::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        };
        let last = shape.iter().zip(strides).map(|(d, s)| d.saturating_sub(1) * s).sum::<usize>();
        if shape.len() != strides.len() || (shape.iter().product::<usize>() > 0 && offset + last >= len) {
            return Err(Error::shape(
                "as_strided",
                format!("view {shape:?}/{strides:?}+{offset} exceeds {len} elements"),
            ));
        }
        Ok(Tensor { storage: self.storage.clone(), shape: shape.to_vec(), strides: strides.to_vec(), offset })
    }

    /// CPU storage, if the tensor lives on the host.
    pub fn cpu_storage(&self) -> Option<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(s) => Some(s),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// Storage offsets of every element in row-major order of the view.
    pub fn for_each_offset(&self, mut f: impl FnMut(usize)) {
        let (inner, inner_stride) = match self.rank() {
            0 => (1, 1),
            r => (self.shape[r - 1], self.strides[r - 1]),
        };
        self.for_each_row(|base| (0..inner).for_each(|j| f(base + j * inner_stride)));
    }

    /// The storage offset of each row (all indices but the last, in order); a rank-0 tensor is
    /// one row.
    fn for_each_row(&self, mut f: impl FnMut(usize)) {
        let rank = self.rank();
        if self.numel() == 0 {
            return;
        }
        if rank == 0 {
            f(self.offset);
            return;
        }
        let outer: usize = self.shape[..rank - 1].iter().product();
        let mut index = vec![0usize; rank - 1];
        for _ in 0..outer {
            f(self.offset + index.iter().zip(&self.strides[..rank - 1]).map(|(i, s)| i * s).sum::<usize>());
            for d in (0..rank - 1).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }

    /// Copy the values to host memory as f32, in row-major order of the view.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::Cpu(s) => {
                if let (CpuStorage::F32(v), true) = (s, self.is_contiguous()) {
                    return Ok(v[self.offset..self.offset + self.numel()].to_vec());
                }
                if let (Some(bytes), true) = (s.raw_bytes(), self.is_contiguous()) {
                    let size = s.dtype().size_in_bytes();
                    let range = self.offset * size..(self.offset + self.numel()) * size;
                    return Ok(crate::dtype::decode_to_f32(&bytes[range], s.dtype()));
                }
                let mut out = Vec::with_capacity(self.numel());
                let inner = self.shape.last().copied().unwrap_or(1);
                match s {
                    // Views with whole rows in the storage (narrowed last axes): one copy per row.
                    CpuStorage::F32(v) if self.strides.last().is_none_or(|&st| st == 1) => {
                        self.for_each_row(|base| out.extend_from_slice(&v[base..base + inner]))
                    }
                    _ => self.for_each_offset(|o| out.push(s.get_f32(o))),
                }
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.to_vec_f32(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::from_f32((0..n).map(|i| i as f32).collect(), shape).unwrap()
    }

    #[test]
    fn views_read_the_right_elements() {
        let t = iota(&[2, 3, 4]);
        assert_eq!(
            t.narrow(2, 1, 2).unwrap().to_vec_f32().unwrap(),
            vec![1., 2., 5., 6., 9., 10., 13., 14., 17., 18., 21., 22.]
        );
        let p = t.permute(&[2, 0, 1]).unwrap();
        assert_eq!(p.shape(), &[4, 2, 3]);
        assert_eq!(&p.to_vec_f32().unwrap()[..6], &[0., 4., 8., 12., 16., 20.]);
        let c = t.chunk(3, 1).unwrap();
        assert_eq!(c[2].to_vec_f32().unwrap(), vec![8., 9., 10., 11., 20., 21., 22., 23.]);
        assert!(!t.narrow(2, 0, 2).unwrap().is_contiguous());
        assert!(t.narrow(0, 1, 1).unwrap().is_contiguous());
    }

    #[test]
    fn reshape_of_a_column_slice_splits_heads_without_copying() {
        // [2 tokens, 12] -> columns 4..10 -> [2, 3 heads, 2]
        let t = iota(&[2, 12]);
        let v = t.narrow(1, 4, 6).unwrap().reshape(&[2, 3, 2]).unwrap();
        assert_eq!(v.strides(), &[12, 2, 1]);
        assert_eq!(v.to_vec_f32().unwrap(), vec![4., 5., 6., 7., 8., 9., 16., 17., 18., 19., 20., 21.]);
        let merged = v.reshape(&[2, 6]).unwrap();
        assert_eq!(merged.to_vec_f32().unwrap(), t.narrow(1, 4, 6).unwrap().to_vec_f32().unwrap());
    }

    #[test]
    fn bad_views_are_errors() {
        let t = iota(&[2, 3]);
        assert!(t.reshape(&[4, 2]).is_err());
        assert!(t.narrow(1, 2, 2).is_err());
        assert!(t.chunk(2, 1).is_err());
        assert!(t.permute(&[0, 0]).is_err());
        assert!(t.permute(&[1, 0]).unwrap().reshape(&[6]).is_err());
        assert!(iota(&[2, 4]).narrow(1, 0, 2).unwrap().reshape(&[4]).is_err());
        assert!(Tensor::from_f32(vec![0.0; 5], &[2, 3]).is_err());
    }
}
