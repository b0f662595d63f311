//! The `flux2` command line: thin wrappers over the library.

pub mod bench;
pub mod compare;
pub mod doctor;
pub mod forward;
pub mod generate;
pub mod inspect;
pub mod model_args;
pub mod plan;
pub mod selftest;
pub mod serve;
pub mod synth;

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// Read a tensor of any numeric dtype (floats, and ints for position ids) as f32.
pub fn read_f32(store: &WeightStore, name: &str) -> Result<Tensor> {
    let t = store.get(name)?;
    let values: Vec<f32> = match t.stored_dtype.as_str() {
        "I64" => t.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        "I32" => t.bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        "F64" => t.bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        _ => t.to_f32()?,
    };
    Tensor::from_f32(values, t.shape())
}

/// Write f32 tensors to a safetensors file.
pub fn write_f32(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    use crate::weights::safetensors::{write_safetensors, TensorEntry};
    let data: Vec<(String, Vec<f32>, Vec<usize>)> =
        tensors.iter().map(|(n, t)| Ok((n.to_string(), t.to_vec_f32()?, t.shape().to_vec()))).collect::<Result<_>>()?;
    let entries = data.iter().map(|(n, v, s)| TensorEntry::from_f32(n, v, s, crate::DType::F32)).collect();
    write_safetensors(path, entries, &Default::default())
}

pub fn expect_rank(name: &str, t: &Tensor, ranks: &[usize]) -> Result<()> {
    if !ranks.contains(&t.rank()) {
        return Err(Error::InvalidArgument(format!(
            "input `{name}` has shape {:?}; expected rank {ranks:?}",
            t.shape()
        )));
    }
    Ok(())
}
