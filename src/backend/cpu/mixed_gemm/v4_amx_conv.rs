//! v4 convolution: a stride-1 2-D convolution on AMX tiles that reads the image itself, with no
//! unfolded rows. The input is rounded once to bf16 in a zero-padded layout made for the tiles'
//! second operand: for each block of 32 channels and each padded image row, 16 lines (one per
//! channel pair) of `wpa` pixels, each pixel one u32 holding the pair. Then for tap (ky, kx), the
//! 16 output pixels (oy, ox..ox + 16) and a channel block, the operand is 16 lines of 64 bytes at
//! a fixed stride starting at pixel (oy + ky, ox + kx): one `tileloadd`. The weight, packed once
//! in (tap, channel) order, is the first operand, so each accumulator tile is 16 output channels
//! × 16 consecutive pixels of one row: its rows are stored straight into the channel planes.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::v4_amx::{configure_tiles, dot_2x2, quad, release_tiles, store_accumulators, zero_accumulators, TILE};
use super::{OutPtr, Weights};
use crate::backend::Padding2d;

/// Output channels per weight panel (two 16-row tiles) and pixels per step along a row (two
/// 16-column tiles).
const NR: usize = 32;
const PX: usize = 32;
/// Channels per k step (16 pairs).
const CH: usize = 32;
/// Output pixels per task, about: enough work to amortise a task, small enough to balance.
const TASK_PIXELS: usize = 512;
/// Weight panels per task: at most ~1 MiB of them, so they stay in L2 across the task's rows.
const PANEL_BUDGET: usize = 1 << 20;

/// A convolution weight packed for `apply`: per panel of 32 output channels and per k step
/// (tap t, channel block cb), two 16 × 16 u32 tiles (output channels 0–15, then 16–31), row =
/// output channel, entry = the bf16 pair of channels (2j, 2j + 1) of the block at tap t.
pub(crate) struct DirectConv {
    data: Vec<u32>,
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    blocks: usize,
}

impl DirectConv {
    /// `w`: `[cout × cin·kh·kw]` rows in the stored (channel, ky, kx) order, bf16 or fp8.
    ///
    /// # Safety
    /// `v4_amx::available()` must be true (`apply` relies on it).
    pub(super) unsafe fn new(w: &Weights, cin: usize, kh: usize, kw: usize) -> DirectConv {
        let (cout, taps) = (w.n, kh * kw);
        assert_eq!(w.k, cin * taps);
        let blocks = cin.div_ceil(CH);
        let panel_len = taps * blocks * 2 * TILE;
        let mut data = vec![0u32; cout.div_ceil(NR) * panel_len];
        data.par_chunks_mut(panel_len.max(1)).enumerate().for_each(|(p, panel)| {
            let mut row = vec![0f32; w.k];
            for c in 0..NR.min(cout - p * NR) {
                w.row_f32(p * NR + c, 0, &mut row);
                for ci in 0..cin {
                    for t in 0..taps {
                        // bf16 and fp8 e4m3 values are exact in bf16.
                        let bits = half::bf16::from_f32(row[ci * taps + t]).to_bits() as u32;
                        let step = t * blocks + ci / CH;
                        let slot = (step * 2 + c / 16) * TILE + (c % 16) * 16 + (ci % CH) / 2;
                        panel[slot] |= bits << (16 * (ci % 2));
                    }
                }
            }
        });
        DirectConv { data, cin, cout, kh, kw, blocks }
    }

    /// One image: `x` `[cin × h × wd]` f32 into `out` `[cout × ho × wo]`, plus `bias`.
    pub(crate) fn apply(&self, x: &[f32], h: usize, wd: usize, pad: Padding2d, bias: Option<&[f32]>, out: &mut [f32]) {
        let (hp, wp) = (h + pad.top + pad.bottom, wd + pad.left + pad.right);
        let (ho, wo) = (hp + 1 - self.kh, wp + 1 - self.kw);
        assert!(x.len() == self.cin * h * wd && out.len() == self.cout * ho * wo);
        assert!(bias.is_none_or(|b| b.len() == self.cout));
        if ho * wo == 0 || self.cout == 0 {
            return;
        }
        // Lines long enough for the last 32-pixel step's reads at the last tap.
        let wpa = wp.max(wo.div_ceil(PX) * PX + self.kw - 1).div_ceil(16) * 16;
        let image = Image { data: pack_image(x, self.cin, h, wd, pad, wpa), hp, wpa };

        let taps = self.kh * self.kw;
        let panel_len = taps * self.blocks * 2 * TILE;
        let panels = self.cout.div_ceil(NR);
        let per_task = (PANEL_BUDGET / (panel_len * 4)).clamp(1, panels);
        let rows_per_task = (TASK_PIXELS / wo).clamp(1, ho);
        let tasks: Vec<(usize, usize)> = (0..panels)
            .step_by(per_task)
            .flat_map(|p0| (0..ho).step_by(rows_per_task).map(move |r0| (p0, r0)))
            .collect();
        let dst = OutPtr { ptr: out.as_mut_ptr(), ld: ho * wo };
        tasks.into_par_iter().for_each(|(p0, r0)| {
            let rows = r0..(r0 + rows_per_task).min(ho);
            // SAFETY: the caller saw AMX; tasks write disjoint (channel, row) blocks of `out`.
            unsafe { self.task(&image, p0..(p0 + per_task).min(panels), rows, wo, bias, dst) }
        });
    }

    /// Panels `panels` × output rows `rows`: for each panel, row and 32-pixel step, the four
    /// accumulator tiles over every (tap, channel block) step, then stored into the planes.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn task(
        &self,
        image: &Image,
        panels: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
        wo: usize,
        bias: Option<&[f32]>,
        out: OutPtr,
    ) {
        let (taps, blocks) = (self.kh * self.kw, self.blocks);
        let panel_len = taps * blocks * 2 * TILE;
        let line_bytes = image.wpa * 4;
        let block_len = image.hp * 16 * image.wpa;
        let mut acc = Tiles([0f32; 4 * TILE]);
        configure_tiles();
        for p in panels {
            let wp = self.data.as_ptr().add(p * panel_len);
            for oy in rows.clone() {
                for ox in (0..wo).step_by(PX) {
                    zero_accumulators();
                    for t in 0..taps {
                        let (ky, kx) = (t / self.kw, t % self.kw);
                        let line0 = image.data.as_ptr().add((oy + ky) * 16 * image.wpa + ox + kx);
                        for cb in 0..blocks {
                            let b = line0.add(cb * block_len);
                            let a = wp.add((t * blocks + cb) * 2 * TILE);
                            dot_2x2([a, a.add(TILE)], 64, [b, b.add(16)], line_bytes);
                        }
                    }
                    store_accumulators(quad(acc.0.as_mut_ptr(), TILE, 2 * TILE), 64);
                    self.store(&acc, p, oy, ox, wo, bias, out);
                }
            }
        }
        release_tiles();
    }

    /// Tile (i, j) holds output channels 32p + 16i.., pixels ox + 16j.. of row oy.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store(&self, acc: &Tiles, p: usize, oy: usize, ox: usize, wo: usize, bias: Option<&[f32]>, out: OutPtr) {
        for (t, tile) in acc.0.chunks_exact(TILE).enumerate() {
            let (co0, x0) = (p * NR + 16 * (t / 2), ox + 16 * (t % 2));
            if x0 >= wo {
                continue;
            }
            let mask: __mmask16 = if wo - x0 >= 16 { 0xffff } else { (1u16 << (wo - x0)) - 1 };
            for (r, row) in tile.chunks_exact(16).take(self.cout.saturating_sub(co0)).enumerate() {
                let co = co0 + r;
                let v = _mm512_add_ps(_mm512_loadu_ps(row.as_ptr()), _mm512_set1_ps(bias.map_or(0.0, |b| b[co])));
                _mm512_mask_storeu_ps(out.ptr.add(co * out.ld + oy * wo + x0), mask, v);
            }
        }
    }
}

#[repr(C, align(64))]
struct Tiles([f32; 4 * TILE]);

/// The padded bf16 image: `[block][padded row][pair 0..16][wpa]` u32.
struct Image {
    data: Vec<u32>,
    hp: usize,
    wpa: usize,
}

/// `x` `[cin × h × wd]` into the padded layout (zeros around the image and past `cin`).
fn pack_image(x: &[f32], cin: usize, h: usize, wd: usize, pad: Padding2d, wpa: usize) -> Vec<u32> {
    let (blocks, hp, line_block) = (cin.div_ceil(CH), h + pad.top + pad.bottom, 16 * wpa);
    let mut data = vec![0u32; blocks * hp * line_block];
    data.par_chunks_mut(line_block).enumerate().for_each(|(i, lines)| {
        let (cb, y) = (i / hp, i % hp);
        if y < pad.top || y >= pad.top + h {
            return;
        }
        let iy = y - pad.top;
        for (j, line) in lines.chunks_exact_mut(wpa).enumerate() {
            let c = cb * CH + 2 * j;
            if c >= cin {
                break;
            }
            let even = &x[(c * h + iy) * wd..(c * h + iy + 1) * wd];
            let odd = (c + 1 < cin).then(|| &x[((c + 1) * h + iy) * wd..((c + 1) * h + iy + 1) * wd]);
            // SAFETY: DirectConv exists only where AMX (hence AVX-512 BF16) is available.
            unsafe { interleave_pairs(even, odd, &mut line[pad.left..pad.left + wd]) };
        }
    });
    data
}

/// `dst[i] = bf16(even[i]) | bf16(odd[i]) << 16`, rounded to nearest even (odd absent: zero).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_pairs(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) {
    for x0 in (0..dst.len()).step_by(16) {
        let n = (dst.len() - x0).min(16);
        let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
        let e = _mm512_maskz_loadu_ps(mask, even.as_ptr().add(x0));
        let o = odd.map_or(_mm512_setzero_ps(), |o| _mm512_maskz_loadu_ps(mask, o.as_ptr().add(x0)));
        // Low 16 halves: the even channel's values; high 16: the odd one's.
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
        let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(both));
        let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(both));
        let pairs = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
        _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(x0) as *mut _, mask, pairs);
    }
}
