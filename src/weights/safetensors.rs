//! Safetensors reading (memory-mapped, validated header, lazy per-tensor access) and writing
//! (streamed, so multi-GB random checkpoints never sit in memory).
//!
//! Format: 8-byte little-endian header length N, N bytes of JSON
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`, then the data.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;
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
    /// Element count (the header check guarantees it fits; saturating for hand-built infos).
    pub fn numel(&self) -> usize {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX)
    }

    /// The engine dtype, if it is one we compute with.
    pub fn dtype(&self) -> Option<DType> {
        engine_dtype(&self.dtype)
    }
}

/// The engine dtype of a safetensors dtype string, if it is one we compute with.
pub fn engine_dtype(dtype: &str) -> Option<DType> {
    match dtype {
        "F32" => Some(DType::F32),
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        "F8_E4M3" => Some(DType::F8E4M3),
        _ => None,
    }
}

/// Bits per element of a safetensors dtype string.
pub fn dtype_bits(dtype: &str) -> Option<usize> {
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
    /// Shared so that CPU weights can keep pointing into it (`super::mapping`).
    mmap: Arc<Mmap>,
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
        let mmap = Arc::new(mmap);
        super::mapping::register(&mmap);
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

/// One header entry as the format defines it (the derive also rejects a repeated field).
#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

enum Entry {
    Tensor(RawInfo),
    Metadata(BTreeMap<String, String>),
}

/// Reads the top-level object key by key: serde_json's own map would silently keep only the last
/// of two entries with the same name, and a checkpoint must not mean two things.
struct HeaderVisitor<'a> {
    /// The reason for a failure inside one entry, with the entry's name (serde's error alone would
    /// lose it; see `parse_header`).
    named_error: &'a mut Option<String>,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Vec<(String, Entry)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                *self.named_error = Some(format!("tensor `{name}` is listed twice in the header"));
                return Err(A::Error::custom("duplicate key"));
            }
            let entry = if name == "__metadata__" {
                map.next_value::<BTreeMap<String, String>>().map(Entry::Metadata).map_err(|e| {
                    *self.named_error = Some(format!("`__metadata__` must map strings to strings: {e}"));
                    e
                })?
            } else {
                map.next_value::<RawInfo>().map(Entry::Tensor).map_err(|e| {
                    *self.named_error = Some(format!("tensor `{name}`: {e}"));
                    e
                })?
            };
            entries.push((name, entry));
        }
        Ok(entries)
    }
}

/// Parse and check a whole file image by the format's own rules: a known dtype per tensor, a byte
/// size equal to numel · bits / 8 (checked, never wrapping), and offsets that tile the data
/// region exactly (no overlap, no gap, nothing after the last tensor, as safetensors' own
/// validator requires; its writers never pad the data, only the header).
fn parse_header(buf: &[u8]) -> std::result::Result<Header, String> {
    let Some(len_bytes) = buf.get(..8) else {
        return Err(format!("file is only {} bytes; too small for a header", buf.len()));
    };
    let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(format!("header length {n} is implausible (corrupt or not safetensors)"));
    }
    let data_start = usize::try_from(n).ok().and_then(|n| n.checked_add(8)).ok_or("header length overflows")?;
    let Some(json) = buf.get(8..data_start) else {
        return Err(format!("header claims {n} bytes but the file has {} (truncated)", buf.len() - 8));
    };
    let data_len = buf.len() - data_start;

    let mut named_error = None;
    let mut de = serde_json::Deserializer::from_slice(json);
    // Only whitespace (the writers' padding) may follow the object.
    let parsed = (&mut de)
        .deserialize_map(HeaderVisitor { named_error: &mut named_error })
        .and_then(|entries| de.end().map(|()| entries));
    let entries = match (parsed, named_error) {
        (Ok(entries), _) => entries,
        (Err(_), Some(reason)) => return Err(reason),
        (Err(e), None) => return Err(format!("header is not valid JSON: {e}")),
    };

    let mut tensors = HashMap::new();
    let mut metadata = BTreeMap::new();
    let mut spans = Vec::new();
    for (name, entry) in entries {
        let info = match entry {
            Entry::Metadata(m) => {
                metadata = m;
                continue;
            }
            Entry::Tensor(info) => info,
        };
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let (begin, end) = info.data_offsets;
        if begin > end {
            return Err(bad(&format!("data_offsets [{begin}, {end}] are reversed")));
        }
        if end > data_len as u64 {
            return Err(bad(&format!("data ends at byte {end} but the file holds {data_len} data bytes (truncated)")));
        }
        // Both fit in usize now: they are at most `data_len`.
        let (begin, end) = (begin as usize, end as usize);
        let bits = dtype_bits(&info.dtype).ok_or_else(|| bad(&format!("unknown dtype {}", info.dtype)))?;
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<_>>()
            .ok_or_else(|| bad(&format!("shape {:?} does not fit in memory", info.shape)))?;
        let total_bits = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|numel| numel.checked_mul(bits))
            .ok_or_else(|| bad(&format!("shape {shape:?} of {} overflows the address space", info.dtype)))?;
        if total_bits % 8 != 0 {
            return Err(bad(&format!("shape {shape:?} of {} is not a whole number of bytes", info.dtype)));
        }
        let expected = total_bits / 8;
        if end - begin != expected {
            return Err(bad(&format!(
                "{} bytes stored for shape {shape:?} of {}, which needs {expected}",
                end - begin,
                info.dtype
            )));
        }
        spans.push((begin, end, name.clone()));
        let (start, end) = (data_start + begin, data_start + end);
        tensors.insert(name, TensorInfo { dtype: info.dtype, shape, start, end });
    }
    check_tiling(spans, data_len)?;
    Ok((tensors, metadata))
}

/// The tensors' byte ranges must cover `0..data_len` exactly once, in some order.
fn check_tiling(mut spans: Vec<(usize, usize, String)>, data_len: usize) -> std::result::Result<(), String> {
    spans.sort();
    let mut covered = 0usize;
    let mut last: Option<&str> = None;
    for (begin, end, name) in &spans {
        if *begin < covered {
            let prev = last.unwrap_or_default();
            return Err(format!("tensor `{name}` overlaps `{prev}` (bytes {begin}..{end} start before {covered})"));
        }
        if *begin > covered {
            return Err(format!("gap of {} bytes before tensor `{name}`", begin - covered));
        }
        covered = *end;
        last = Some(name);
    }
    if covered < data_len {
        return Err(format!("data region has {} bytes after the last tensor", data_len - covered));
    }
    Ok(())
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
        let size = e
            .shape
            .iter()
            .try_fold(e.dtype.size_in_bytes(), |a, &d| a.checked_mul(d))
            .filter(|size| offset.checked_add(*size).is_some())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: tensor `{}` of shape {:?} is too large",
                    path.display(),
                    e.name,
                    e.shape
                ))
            })?;
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
