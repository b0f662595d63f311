//! Which live memory map a byte slice lies in. The CPU backend keeps a bf16/f16/fp8 weight where
//! the checkpoint's pages are (an `Arc` of the map plus a byte range) instead of copying it, so a
//! loader that only hands it `&[u8]` (every model's weight loading) still gets zero-copy weights.
//! Maps register here when opened; the registry holds them weakly, so it never keeps a file open.

use std::sync::{Arc, Mutex, Weak};

use memmap2::Mmap;

/// A byte range of a memory map that stays mapped as long as this value lives.
#[derive(Clone)]
pub struct MappedBytes {
    owner: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl MappedBytes {
    pub fn bytes(&self) -> &[u8] {
        &self.owner[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` bytes from `start` of this range (None past its end).
    pub fn slice(&self, start: usize, len: usize) -> Option<MappedBytes> {
        (start.checked_add(len)? <= self.len).then(|| MappedBytes {
            owner: self.owner.clone(),
            start: self.start + start,
            len,
        })
    }
}

impl std::fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBytes({} bytes at {})", self.len, self.start)
    }
}

static REGISTRY: Mutex<Vec<Weak<Mmap>>> = Mutex::new(Vec::new());

/// Make `map` findable by `find` while it lives.
pub fn register(map: &Arc<Mmap>) {
    let mut maps = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    maps.retain(|w| w.strong_count() > 0);
    maps.push(Arc::downgrade(map));
}

/// The live map that holds all of `bytes`, with their range inside it.
pub fn find(bytes: &[u8]) -> Option<MappedBytes> {
    let (lo, hi) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
    let maps = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    // Newest first: an address range freed by a dropped map may be reused by a later one.
    maps.iter().rev().filter_map(Weak::upgrade).find_map(|owner| {
        let base = owner.as_ptr() as usize;
        (lo >= base && hi <= base + owner.len()).then(|| MappedBytes { start: lo - base, len: bytes.len(), owner })
    })
}
