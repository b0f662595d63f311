//! Host memory as the kernel reports it: what is available to plan against, and this process's
//! resident and anonymous memory for reports. Linux reads `/proc`; elsewhere the readings are
//! `None` and callers go on without them (a plan then needs an explicit budget).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// This process's memory (bytes).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcessMemory {
    /// VmRSS: resident now (anonymous + file-backed pages such as mapped weights).
    pub resident: usize,
    /// VmHWM: the peak of `resident` since the process started.
    pub peak_resident: usize,
    /// RssAnon: resident anonymous memory (heap: activations, widened weights).
    pub anonymous: usize,
    /// RssFile: resident file-backed pages (the memory-mapped checkpoints being used).
    pub file: usize,
}

/// Asks the allocator to keep freed buffers for reuse instead of returning them to the kernel:
/// the CPU path frees and allocates activations of the same few sizes hundreds of times per
/// forward, and glibc's defaults (large blocks mapped fresh each time, the top of the heap
/// trimmed) make every one of them fault in and zero new pages — ~5% of a DiT forward in kernel
/// time on 2 cores. Only the threshold below which blocks come from the heap changes (1 GiB,
/// glibc's largest), so peak memory stays what the program holds at once. glibc only; a no-op
/// elsewhere, as other allocators decide this themselves.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters, under glibc's own lock, so
            // allocations on other threads at the same time are safe.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

/// `MemAvailable` of /proc/meminfo: what can be allocated without swapping (free memory plus
/// reclaimable page cache).
pub fn available() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        field_kib(&text, "MemAvailable:")
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The readings of /proc/self/status.
pub fn process() -> Option<ProcessMemory> {
    #[cfg(target_os = "linux")]
    {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(ProcessMemory {
            resident: field_kib(&text, "VmRSS:")?,
            peak_resident: field_kib(&text, "VmHWM:")?,
            anonymous: field_kib(&text, "RssAnon:")?,
            file: field_kib(&text, "RssFile:").unwrap_or(0),
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// `name   123 kB` -> bytes.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn field_kib(text: &str, name: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: usize = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The kernel keeps no peak of anonymous memory, so a thread samples it (every 20 ms) until
/// dropped; `peak_anonymous` is the largest reading so far.
pub struct AnonPeak {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl AnonPeak {
    /// None where the process's memory cannot be read.
    pub fn start() -> Option<AnonPeak> {
        let first = process()?.anonymous;
        let peak = Arc::new(AtomicUsize::new(first));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::Builder::new()
            .name("anon-peak".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(m) = process() {
                        p.fetch_max(m.anonymous, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .ok()?;
        Some(AnonPeak { peak, stop })
    }

    pub fn peak_anonymous(&self) -> usize {
        if let Some(m) = process() {
            self.peak.fetch_max(m.anonymous, Ordering::Relaxed);
        }
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for AnonPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_kib_fields() {
        let text = "VmHWM:\t  2048 kB\nRssAnon:\t   12 kB\n";
        assert_eq!(super::field_kib(text, "VmHWM:"), Some(2 << 20));
        assert_eq!(super::field_kib(text, "RssAnon:"), Some(12 << 10));
        assert_eq!(super::field_kib(text, "VmRSS:"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_memory_and_the_host_some_available() {
        let m = super::process().unwrap();
        assert!(m.resident > 0 && m.peak_resident >= m.resident && m.anonymous > 0);
        assert!(super::available().unwrap() > 0);
    }
}
