//! Safetensors reading (memory-mapped, validated header, lazy per-tensor access) and writing
//! (streamed, so multi-GB random checkpoints never sit in memory).
//!
//! Format: 8-byte little-endian header length N, N bytes of JSON
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`, then the data.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest header we accept (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The safetensors dtype string ("BF16", "F8_E4M3", ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range inside the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The engine dtype, if it is one we compute with.
    pub fn dtype(&self) -> Option<DType> {
        match self.dtype.as_str() {
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            "F8_E4M3" => Some(DType::F8E4M3),
            _ => None,
        }
    }
}

fn dtype_bits(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        _ => return None,
    })
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: HashMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
        // truncated by another process while we run.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (tensors, metadata) =
            parse_header(&mmap).map_err(|reason| Error::CorruptFile { path: path.to_path_buf(), reason })?;
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &HashMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.end]
    }
}

type Header = (HashMap<String, TensorInfo>, BTreeMap<String, String>);

fn parse_header(buf: &[u8]) -> std::result::Result<Header, String> {
    if buf.len() < 8 {
        return Err(format!("file is only {} bytes; too small for a header", buf.len()));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > MAX_HEADER {
        return Err(format!("header length {n} is implausible (corrupt or not safetensors)"));
    }
    let n = n as usize;
    if 8 + n > buf.len() {
        return Err(format!("header claims {n} bytes but the file has {} (truncated)", buf.len() - 8));
    }
    let json: Value = serde_json::from_slice(&buf[8..8 + n]).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let obj = json.as_object().ok_or("header is not a JSON object")?;
    let data_len = buf.len() - 8 - n;
    let mut tensors = HashMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                }
            }
            continue;
        }
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let dtype = v.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("missing dtype"))?.to_string();
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offs = v.get("data_offsets").and_then(Value::as_array).ok_or_else(|| bad("missing data_offsets"))?;
        let (begin, end) = match offs.as_slice() {
            [a, b] => (
                a.as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize,
                b.as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize,
            ),
            _ => return Err(bad("data_offsets must be [begin, end]")),
        };
        if begin > end {
            return Err(bad("data_offsets are reversed"));
        }
        if end > data_len {
            return Err(bad(&format!("data ends at byte {end} but the file holds {data_len} data bytes (truncated)")));
        }
        let bits = dtype_bits(&dtype).ok_or_else(|| bad(&format!("unknown dtype {dtype}")))?;
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("shape overflows"))?;
        let expected = (numel * bits).div_ceil(8);
        if end - begin != expected {
            return Err(bad(&format!(
                "{} bytes stored for shape {shape:?} of {dtype}, which needs {expected}",
                end - begin
            )));
        }
        tensors.insert(name.clone(), TensorInfo { dtype, shape, start: 8 + n + begin, end: 8 + n + end });
    }
    Ok((tensors, metadata))
}

/// A tensor to be written: name, dtype, shape, and a producer of its bytes.
pub struct TensorEntry<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub write: Box<dyn FnMut(&mut dyn Write) -> std::io::Result<()> + 'a>,
}

impl<'a> TensorEntry<'a> {
    /// An entry whose bytes are already in memory.
    pub fn from_f32(name: &str, values: &'a [f32], shape: &[usize], dtype: DType) -> TensorEntry<'a> {
        TensorEntry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            write: Box::new(move |w| {
                for chunk in values.chunks(1 << 16) {
                    w.write_all(&crate::dtype::encode_from_f32(chunk, dtype))?;
                }
                Ok(())
            }),
        }
    }
}

/// Write a safetensors file, streaming each tensor's bytes from its producer, in the given order.
pub fn write_safetensors(
    path: &Path,
    entries: Vec<TensorEntry<'_>>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap());
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(entries.len());
    for e in &entries {
        let size = e.shape.iter().product::<usize>() * e.dtype.size_in_bytes();
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype.safetensors_name(), "shape": e.shape, "data_offsets": [offset, offset + size]}),
        );
        sizes.push(size);
        offset += size;
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let io = |e| Error::io(path, e);
    // Atomic: a failed write (a full disk) leaves any file already at `path` as it was.
    crate::output_file::write_with(path, |w| {
        w.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&json).map_err(io)?;
        for (mut e, size) in entries.into_iter().zip(sizes) {
            let mut counter = CountingWriter { inner: &mut *w, count: 0 };
            (e.write)(&mut counter).map_err(io)?;
            if counter.count != size {
                return Err(Error::Other(format!(
                    "{}: tensor `{}` produced {} bytes, expected {size}",
                    path.display(),
                    e.name,
                    counter.count
                )));
            }
        }
        Ok(())
    })
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    count: usize,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
