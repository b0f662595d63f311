//! v4: AMX tiles (`tdpbf16ps`: a 16×32 bf16 tile times a 32×16 one into 16×16 f32 accumulators,
//! one instruction). Four accumulator tiles cover 32 tokens × 32 columns; per 32-wide step of k
//! the kernel loads two activation tiles and two weight tiles. Activations are rounded to bf16
//! once per GEMM (as in v3) into rows padded to whole tiles; each task repacks its columns'
//! weights, one k-chunk at a time, into the tiles' pair-interleaved ("VNNI") layout, bf16 bits
//! unchanged (fp8 widened to bf16, exact), while the next chunk's bytes are prefetched. Rust's
//! AMX intrinsics are unstable, so the five instructions used are inline assembly; Linux hands
//! out the tile state only on request (`arch_prctl`), see `available`.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::v4_amx_pack::pack_panel;
use super::{OutPtr, Weights};

/// Columns per weight panel (two 16-column tiles).
pub(super) const NR: usize = 32;
/// Tokens per step of the outer loop (two 16-row tiles).
const MR: usize = 32;
/// k pairs per tile row (64 bytes).
pub(super) const PAIRS: usize = 16;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the OS lets this process use the tiles.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let leaf7 = __cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 22 & 1 == 1);
        tile && bf16 && os_grants_tiles()
    })
}

/// Linux enables the 8 KiB tile state per process, on request (ARCH_REQ_XCOMP_PERM for
/// XFEATURE_XTILEDATA); a kernel without AMX support refuses and the path stays off.
#[cfg(target_os = "linux")]
fn os_grants_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// Elsewhere (Windows) the OS enables the tile state for everyone when it supports it: XCR0
/// bits 17 (XTILECFG) and 18 (XTILEDATA).
#[cfg(not(target_os = "linux"))]
fn os_grants_tiles() -> bool {
    let osxsave = __cpuid(1).ecx >> 27 & 1 == 1;
    // SAFETY: xgetbv is valid when OSXSAVE is set.
    osxsave && unsafe { xcr0() } >> 17 & 3 == 3
}

#[cfg(not(target_os = "linux"))]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    _xgetbv(0)
}

/// Activations as bf16 pairs, tile by tile: for each block of 16 rows (m rounded up to MR) and
/// each step of 16 pairs (⌈k/2⌉ rounded up), one contiguous 16 × 16 u32 tile; zero-padded.
/// The buffer goes back to `ACTIVATION_BUFFER` when dropped, so the next GEMM reuses its pages
/// instead of faulting in (and zeroing) megabytes of fresh memory.
pub(super) struct Activations {
    data: Vec<u32>,
    steps: usize,
}

/// One spare activation buffer, the largest seen; GEMMs that overlap allocate their own.
static ACTIVATION_BUFFER: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

impl Drop for Activations {
    fn drop(&mut self) {
        let mut spare = ACTIVATION_BUFFER.lock().unwrap_or_else(|e| e.into_inner());
        if self.data.capacity() > spare.capacity() {
            *spare = std::mem::take(&mut self.data);
        }
    }
}

pub(super) const TILE: usize = 16 * PAIRS;

pub(super) fn pack_activations(m: usize, k: usize, x: &[f32]) -> Activations {
    // The copy into the row buffer is O(m·k), as the rounding itself; the GEMM is O(m·k·n).
    pack_rows(m, k, |i, row| row.copy_from_slice(&x[i * k..(i + 1) * k]))
}

/// `pack_activations` of rows made on the fly (an implicit GEMM's unfolded rows): `fill(i, buf)`
/// writes row i (k values) into a buffer that is reused, so it stays in L1.
pub(super) fn pack_rows(m: usize, k: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Activations {
    let steps = k.div_ceil(2).div_ceil(PAIRS);
    let blocks = m.div_ceil(MR) * (MR / 16);
    let mut data = std::mem::take(&mut *ACTIVATION_BUFFER.lock().unwrap_or_else(|e| e.into_inner()));
    // Every element in use is written below (rows past m as zeros), so a reused buffer's old
    // contents never show through; only growth is zero-filled.
    data.resize(blocks * steps * TILE, 0);
    data.par_chunks_mut((steps * TILE).max(1)).enumerate().for_each(|(b, dst)| {
        let (mut buf, mut pairs) = (vec![0f32; k], vec![0u32; steps * PAIRS]);
        let rows = 16.min(m.saturating_sub(16 * b));
        for r in 0..rows {
            fill(16 * b + r, &mut buf);
            // SAFETY: this path is only chosen when available() saw AMX (so AVX-512 BF16 too).
            unsafe { super::v3_avx512bf16::pack_row(&buf, &mut pairs) };
            for (s, chunk) in pairs.chunks_exact(PAIRS).enumerate() {
                dst[s * TILE + r * PAIRS..s * TILE + (r + 1) * PAIRS].copy_from_slice(chunk);
            }
        }
        for s in 0..steps {
            dst[s * TILE + rows * PAIRS..(s + 1) * TILE].fill(0);
        }
    });
    Activations { data, steps }
}

/// The tile shapes: tiles 0–3 accumulators, 4–5 activations, 6–7 weights; all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }
}

/// Loads the all-full tile configuration; pair with `release_tiles`.
#[inline(always)]
pub(super) unsafe fn configure_tiles() {
    let cfg = TileConfig::all_full();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
}

#[inline(always)]
pub(super) unsafe fn release_tiles() {
    asm!("tilerelease", options(nostack, nomem));
}

/// The four accumulator tiles of a 2 × 2 block in memory: tile (i, j) (tmm0..tmm3 in row-major
/// order) at `base + i·down + j·right` elements.
#[inline(always)]
pub(super) fn quad(base: *mut f32, right: usize, down: usize) -> [*mut f32; 4] {
    // wrapping_add: only addresses here; the callers' bounds make them valid where used.
    [base, base.wrapping_add(right), base.wrapping_add(down), base.wrapping_add(down + right)]
}

#[inline(always)]
pub(super) unsafe fn zero_accumulators() {
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
}

/// tmm0..tmm3 from `quad`'s tiles, rows `stride` bytes apart.
#[inline(always)]
pub(super) unsafe fn load_accumulators(t: [*mut f32; 4], stride: usize) {
    asm!(
        "tileloadd tmm0, [{t0} + {st}*1]",
        "tileloadd tmm1, [{t1} + {st}*1]",
        "tileloadd tmm2, [{t2} + {st}*1]",
        "tileloadd tmm3, [{t3} + {st}*1]",
        t0 = in(reg) t[0], t1 = in(reg) t[1], t2 = in(reg) t[2], t3 = in(reg) t[3], st = in(reg) stride,
        options(nostack, readonly),
    );
}

/// tmm0..tmm3 into `quad`'s tiles, rows `stride` bytes apart.
#[inline(always)]
pub(super) unsafe fn store_accumulators(t: [*mut f32; 4], stride: usize) {
    asm!(
        "tilestored [{t0} + {st}*1], tmm0",
        "tilestored [{t1} + {st}*1], tmm1",
        "tilestored [{t2} + {st}*1], tmm2",
        "tilestored [{t3} + {st}*1], tmm3",
        t0 = in(reg) t[0], t1 = in(reg) t[1], t2 = in(reg) t[2], t3 = in(reg) t[3], st = in(reg) stride,
        options(nostack),
    );
}

/// One k step of a 2 × 2 block: tmm(2i + j) += A tile i · B tile j, A rows `a_stride` bytes
/// apart, B rows `b_stride`. Each operand tile is loaded once, for two products.
#[inline(always)]
pub(super) unsafe fn dot_2x2(a: [*const u32; 2], a_stride: usize, b: [*const u32; 2], b_stride: usize) {
    asm!(
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm6, [{b0} + {sb}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b1} + {sb}*1]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        a0 = in(reg) a[0], a1 = in(reg) a[1], b0 = in(reg) b[0], b1 = in(reg) b[1],
        sa = in(reg) a_stride, sb = in(reg) b_stride,
        options(nostack, readonly),
    );
}

/// Steps of k per pass over a task's panels: the 32 rows of activations they cover (2 KiB per
/// step) stay in L1 while the weight panels stream from L2.
const K_STEPS: usize = 16;
/// The slice of a task's weight panels that one pass over the rows reuses (L2 is 2 MiB per core
/// on Sapphire Rapids; a quarter of it leaves room for the activations and, when k comes in
/// several chunks, the accumulators of every row block; 1 MiB measured ~3% slower).
const PANEL_CHUNK_BYTES: usize = 1 << 19;

/// A whole weight's panels, packed once, for a weight that meets many activations (a
/// convolution's pixel tiles, attention's query blocks).
pub(crate) struct Panels {
    pub(super) data: Vec<u32>,
    pub(super) steps: usize,
    pub n: usize,
    pub k: usize,
}

/// # Safety
/// `available()` must be true.
pub(super) unsafe fn pack_weights(w: &Weights) -> Panels {
    let steps = w.k.div_ceil(2).div_ceil(PAIRS);
    let panel_len = steps * 2 * TILE;
    let mut data = vec![0u32; w.n.div_ceil(NR) * panel_len];
    data.par_chunks_mut(panel_len.max(1)).enumerate().for_each(|(p, panel)| {
        // SAFETY: the caller saw AMX, hence AVX-512.
        unsafe { pack_panel(w, p * NR, (w.n - p * NR).min(NR), 0..steps, panel) }
    });
    Panels { data, steps, n: w.n, k: w.k }
}

/// Columns `j0..j1` of `y = x · wᵀ` (w bf16 or fp8), packing their panels a k-chunk at a time
/// while the stored bytes of the chunk after it (or of the task `next`'s first) are prefetched.
///
/// # Safety
/// `available()` must be true; `xb` from `pack_activations(m, w.k, ..)`; `out` must have m rows
/// of `out.ld` ≥ `w.n` values, with no other writer of these columns.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn block(
    m: usize,
    xb: &Activations,
    w: &Weights,
    j0: usize,
    j1: usize,
    next: Option<(usize, usize)>,
    out: OutPtr,
) {
    compute(m, xb, PanelSource::Stored { w, next }, j0, j1, out);
}

/// `block` on panels packed beforehand; `j0` a multiple of NR.
///
/// # Safety
/// As `block`, with `xb` from `pack_activations(m, w.k, ..)`.
pub(super) unsafe fn block_packed(m: usize, xb: &Activations, w: &Panels, j0: usize, j1: usize, out: OutPtr) {
    let panel_len = w.steps * 2 * TILE;
    compute(m, xb, PanelSource::Packed(&w.data[j0 / NR * panel_len..j1.div_ceil(NR) * panel_len]), j0, j1, out)
}

/// Where `compute` finds a task's weight panels.
enum PanelSource<'a> {
    /// Packed beforehand over the whole of k, one panel after another.
    Packed(&'a [u32]),
    /// Packed by `compute` itself, chunk by chunk, into a per-thread buffer that stays in L2;
    /// `next` is the column range the thread most likely computes after this one.
    Stored { w: &'a Weights<'a>, next: Option<(usize, usize)> },
}

/// The tile loop over the panels of columns `j0..j1`. k is cut into chunks whose slice of the
/// task's panels (≤ `PANEL_CHUNK_BYTES`) stays in L2 while every block of 32 rows passes over it;
/// with more than one chunk, each row block's accumulators wait in `acc` for the next chunk.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn compute(m: usize, xb: &Activations, src: PanelSource, j0: usize, j1: usize, out: OutPtr) {
    let steps = xb.steps;
    let panels = (j1 - j0).div_ceil(NR);
    let chunk_steps = (PANEL_CHUNK_BYTES / (panels * 2 * TILE * 4)).max(1).div_ceil(K_STEPS) * K_STEPS;
    let chunks = steps.div_ceil(chunk_steps);
    let row_blocks = m.div_ceil(MR);
    // Accumulators of 32 rows × the task's columns (four 16 × 16 tiles per panel), one set per
    // row block when k comes in several chunks.
    let set_len = panels * 4 * TILE;
    // Every accumulator is stored before it is read (tilezero starts each), so a per-thread
    // buffer is reused as it is: no zeroing, no fresh pages per call.
    let mut acc = ACCUMULATORS.take();
    let need = if chunks > 1 { row_blocks } else { 1 } * set_len;
    if acc.len() < need {
        acc.resize(need, 0.0);
    }
    // A per-thread buffer for the chunk's panels, reused as it is: pack_panel writes every element.
    let mut chunk_panels = PANELS.take();
    configure_tiles();
    for chunk in 0..chunks {
        let (k0, k1) = (chunk * chunk_steps, ((chunk + 1) * chunk_steps).min(steps));
        // Panel p's step s at `base + p·stride + (s - first)·2·TILE`.
        let (base, stride, first, mut prefetch) = match &src {
            PanelSource::Packed(data) => (data.as_ptr(), steps * 2 * TILE, 0, Prefetch::none()),
            PanelSource::Stored { w, next } => {
                let stride = (k1 - k0) * 2 * TILE;
                chunk_panels.resize(panels * stride, 0);
                for p in 0..panels {
                    let cols = (j1 - j0 - p * NR).min(NR);
                    pack_panel(w, j0 + p * NR, cols, k0..k1, &mut chunk_panels[p * stride..(p + 1) * stride]);
                }
                // The stored bytes packed next: this task's next chunk, or the next task's first.
                let ahead = if chunk + 1 < chunks {
                    Some((j0, j1, k1, (k1 + chunk_steps).min(steps)))
                } else {
                    next.map(|(n0, n1)| (n0, n1, 0, chunk_steps.min(steps)))
                };
                // Spread over every k-step of the chunk's tile loop (bursts stall the tile loads).
                let issues = row_blocks * (k1 - k0) * panels;
                let prefetch =
                    ahead.map_or(Prefetch::none(), |(n0, n1, s0, s1)| Prefetch::new(w, n0..n1, s0..s1, issues));
                (chunk_panels.as_ptr(), stride, k0, prefetch)
            }
        };
        for block in 0..row_blocks {
            let i0 = block * MR;
            let set = &mut acc[if chunks > 1 { block * set_len } else { 0 }..][..set_len];
            let a = xb.data.as_ptr().add(i0 / 16 * steps * TILE);
            for s0 in (k0..k1).step_by(K_STEPS) {
                for p in 0..panels {
                    let tiles = quad(set.as_mut_ptr().add(p * 4 * TILE), TILE, 2 * TILE);
                    if s0 == 0 {
                        zero_accumulators();
                    } else {
                        load_accumulators(tiles, 64);
                    }
                    let b = base.add(p * stride);
                    for s in s0..(s0 + K_STEPS).min(k1) {
                        let b0 = b.add((s - first) * 2 * TILE);
                        prefetch.issue();
                        dot_2x2([a.add(s * TILE), a.add((steps + s) * TILE)], 64, [b0, b0.add(TILE)], 64);
                    }
                    let c0 = j0 + p * NR;
                    if s0 + K_STEPS >= steps && i0 + MR <= m && c0 + NR <= j1 {
                        // Finished and whole: straight into the output rows.
                        store_accumulators(quad(out.ptr.add(i0 * out.ld + c0), 16, 16 * out.ld), out.ld * 4);
                        continue;
                    }
                    store_accumulators(tiles, 64);
                    if s0 + K_STEPS >= steps {
                        write_tiles(&set[p * 4 * TILE..(p + 1) * 4 * TILE], m, i0, c0, j1, out);
                    }
                }
            }
        }
    }
    release_tiles();
    ACCUMULATORS.set(acc);
    PANELS.set(chunk_panels);
}

/// Software prefetch into L2 of a block of a stored weight (rows × a range of k-steps), spread
/// evenly over the tile loop's iterations: the weights' first read is from DRAM, and the tile
/// loop leaves the core's load ports mostly idle while the AMX unit works.
struct Prefetch {
    rows: *const u8,
    row_bytes: usize,
    line_count: usize,
    lines_per_row: usize,
    next: usize,
    per_issue: usize,
}

impl Prefetch {
    fn none() -> Prefetch {
        Prefetch { rows: std::ptr::null(), row_bytes: 0, line_count: 0, lines_per_row: 1, next: 0, per_issue: 0 }
    }

    /// Rows `n` of `w`, the bytes of k-steps `steps`, over `issues` calls of `issue`.
    fn new(w: &Weights, n: std::ops::Range<usize>, steps: std::ops::Range<usize>, issues: usize) -> Prefetch {
        let (k0, k1) = ((steps.start * 2 * PAIRS).min(w.k), (steps.end * 2 * PAIRS).min(w.k));
        let row_bytes = w.row_bytes();
        if n.is_empty() || k1 <= k0 {
            return Prefetch::none();
        }
        // The first line of each row's range, rounded down to its cache line, and every line to its end.
        let range = w.col_bytes(k0, k1);
        let lines_per_row = range.end.div_ceil(64) - range.start / 64;
        let line_count = n.len() * lines_per_row;
        let rows = w.bytes[n.start * row_bytes + range.start / 64 * 64..].as_ptr();
        Prefetch { rows, row_bytes, line_count, lines_per_row, next: 0, per_issue: line_count.div_ceil(issues.max(1)) }
    }

    #[inline(always)]
    fn issue(&mut self) {
        let end = (self.next + self.per_issue).min(self.line_count);
        while self.next < end {
            let (row, line) = (self.next / self.lines_per_row, self.next % self.lines_per_row);
            // wrapping_add: a prefetch of any address is harmless; these stay inside the weight
            // except for the cache line a row's range was rounded up into.
            let ptr = self.rows.wrapping_add(row * self.row_bytes + line * 64) as *const i8;
            // SAFETY: prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr) };
            self.next += 1;
        }
    }
}

thread_local! {
    /// `compute`'s accumulator buffer, kept per worker thread.
    static ACCUMULATORS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// `block`'s packed weight panels, kept per worker thread.
    static PANELS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A panel's finished accumulators at the edge of the output (rows past `m` or columns past
/// `j1` dropped): tile t holds rows i0 + 16·(t / 2).., columns c0 + 16·(t % 2)..
unsafe fn write_tiles(tiles: &[f32], m: usize, i0: usize, c0: usize, j1: usize, out: OutPtr) {
    for (t, tile) in tiles.chunks_exact(TILE).enumerate() {
        let (r0, c0) = (i0 + 16 * (t / 2), c0 + 16 * (t % 2));
        if r0 >= m || c0 >= j1 {
            continue;
        }
        let cols = (j1 - c0).min(16);
        for (r, row) in tile.chunks_exact(16).take(m - r0).enumerate() {
            std::ptr::copy_nonoverlapping(row.as_ptr(), out.ptr.add((r0 + r) * out.ld + c0), cols);
        }
    }
}
