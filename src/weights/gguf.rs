//! GGUF files (llama.cpp's format; the klein GGUF transformers from unsloth and leejet, Qwen3
//! text encoders): a header of typed metadata and tensor records, then aligned tensor data.
//! Memory-mapped; every size and offset checked before use, so a truncated or hostile file is a
//! clear error, never a panic or a read out of bounds.
//!
//! Layout (little-endian): "GGUF", version (2 or 3), tensor count u64, metadata count u64;
//! metadata `key (string), type u32, value`; tensors `name, n_dims u32, dims u64 × n (fastest
//! first), type u32, offset u64`; data at the next multiple of `general.alignment` (32 by default).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::ggml::{self, GgmlType};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// GGUF's type id (see [`GgmlType::from_id`]).
    pub type_id: u32,
    /// PyTorch order (slowest first): GGUF's dims reversed.
    pub shape: Vec<usize>,
    /// Byte range inside the file.
    pub start: usize,
    pub end: usize,
}

impl GgufTensor {
    pub fn ggml_type(&self) -> Option<GgmlType> {
        GgmlType::from_id(self.type_id)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    /// Metadata as JSON values (arrays longer than 64 entries are summarised as their length).
    pub metadata: BTreeMap<String, serde_json::Value>,
    tensors: Vec<GgufTensor>,
    index: HashMap<String, usize>,
}

/// Most tensors and metadata entries a header may declare, and the longest string.
const MAX_ENTRIES: u64 = 1 << 20;
const MAX_STRING: u64 = 1 << 24;

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| format!("the header runs past the end of the file at byte {}", self.at))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(format!("a string of {n} bytes at byte {}", self.at));
        }
        String::from_utf8(self.take(n as usize)?.to_vec())
            .map_err(|_| format!("a string that is not UTF-8 at byte {}", self.at))
    }

    /// One metadata value of type `ty`.
    fn value(&mut self, ty: u32, depth: usize) -> std::result::Result<serde_json::Value, String> {
        use serde_json::Value as V;
        Ok(match ty {
            0 => V::from(self.take(1)?[0]),
            1 => V::from(self.take(1)?[0] as i8),
            2 => V::from(u16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            3 => V::from(i16::from_le_bytes(self.take(2)?.try_into().unwrap())),
            4 => V::from(self.u32()?),
            5 => V::from(self.u32()? as i32),
            6 => V::from(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => V::from(self.take(1)?[0] != 0),
            8 => V::from(self.string()?),
            9 if depth == 0 => {
                let (inner, n) = (self.u32()?, self.u64()?);
                if n > MAX_STRING {
                    return Err(format!("an array of {n} entries"));
                }
                let mut items = Vec::new();
                for i in 0..n {
                    let v = self.value(inner, depth + 1)?;
                    if i < 64 {
                        items.push(v);
                    }
                }
                if n > 64 {
                    V::from(format!("[{n} values]"))
                } else {
                    V::Array(items)
                }
            }
            10 => V::from(self.u64()?),
            11 => V::from(self.u64()? as i64),
            12 => V::from(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => return Err(format!("unknown metadata type {other}")),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; as every mmap loader, we assume the file is not truncated meanwhile.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse(&mmap).map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason: format!("not a valid GGUF file: {reason}"),
        })?;
        let (version, metadata, tensors) = header;
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors, index })
    }

    /// Whether `path` starts with GGUF's magic.
    pub fn is_gguf(path: &Path) -> bool {
        use std::io::Read;
        let mut magic = [0u8; 4];
        File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&GgufTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn bytes(&self, t: &GgufTensor) -> &[u8] {
        &self.mmap[t.start..t.end]
    }

    /// A tensor's values as f32.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.get(name).ok_or_else(|| Error::MissingKey { path: self.path.clone(), key: name.to_string() })?;
        let ty = t.ggml_type().ok_or_else(|| Error::UnsupportedDType {
            path: self.path.clone(),
            key: name.to_string(),
            dtype: GgmlType::name_of_id(t.type_id),
        })?;
        ggml::dequantize(ty, self.bytes(t)).map_err(|reason| Error::CorruptFile { path: self.path.clone(), reason })
    }
}

type Header = (u32, BTreeMap<String, serde_json::Value>, Vec<GgufTensor>);

fn parse(buf: &[u8]) -> std::result::Result<Header, String> {
    let mut r = Reader { buf, at: 0 };
    if r.take(4).ok() != Some(b"GGUF".as_slice()) {
        return Err("it does not start with the GGUF magic".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("version {version} is not supported (2 and 3 are)"));
    }
    let (n_tensors, n_meta) = (r.u64()?, r.u64()?);
    if n_tensors > MAX_ENTRIES || n_meta > MAX_ENTRIES {
        return Err(format!("{n_tensors} tensors and {n_meta} metadata entries are implausible"));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_meta {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0).map_err(|e| format!("metadata `{key}`: {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a <= 1 << 16)
            .ok_or("general.alignment is not a power of two")? as usize,
    };
    let mut records = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let bad = |what: String| format!("tensor `{name}`: {what}");
        if !seen.insert(name.clone()) {
            return Err(bad("appears twice".into()));
        }
        let n_dims = r.u32()?;
        if n_dims == 0 || n_dims > 8 {
            return Err(bad(format!("{n_dims} dimensions")));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(usize::try_from(r.u64()?).map_err(|_| bad("a dimension overflows".into()))?);
        }
        let (type_id, offset) = (r.u32()?, r.u64()?);
        records.push((name, dims, type_id, offset));
    }
    let data_start = r.at.div_ceil(alignment).checked_mul(alignment).ok_or("the data offset overflows")?;
    if data_start > buf.len() {
        return Err("the file ends before its tensor data".into());
    }
    let mut tensors = Vec::new();
    for (name, dims, type_id, offset) in records {
        let bad = |what: String| format!("tensor `{name}`: {what}");
        let numel =
            dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("the shape overflows".into()))?;
        let size = match GgmlType::from_id(type_id) {
            Some(ty) => ty
                .bytes_for(numel)
                .ok_or_else(|| bad(format!("{numel} elements are not whole {} blocks", ty.name())))?,
            // Unknown types are listed (inspect) but have no readable size; they must not be used.
            None => 0,
        };
        if offset % alignment as u64 != 0 {
            return Err(bad(format!("offset {offset} is not aligned to {alignment}")));
        }
        let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
        let end = start.and_then(|s| s.checked_add(size)).filter(|&e| e <= buf.len());
        let (Some(start), Some(end)) = (start, end) else {
            return Err(bad(format!("its {size} bytes at offset {offset} run past the end of the file (truncated)")));
        };
        let shape = dims.into_iter().rev().collect();
        tensors.push(GgufTensor { name, type_id, shape, start, end });
    }
    // Tensors of known size must not share bytes.
    let mut spans: Vec<&GgufTensor> = tensors.iter().filter(|t| t.end > t.start).collect();
    spans.sort_by_key(|t| t.start);
    for pair in spans.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(format!("tensor `{}` overlaps `{}`", pair[1].name, pair[0].name));
        }
    }
    Ok((version, metadata, tensors))
}
