//! RoPE angle tables, computed on the host once per forward. Kernels receive cos/sin tables of
//! shape [N, D/2] (one angle per rotated pair), so the same op serves any position scheme.

use crate::error::{Error, Result};

/// Integer-like position ids of N tokens over `axes` axes (FLUX: t, h, w, l), row-major [N, axes].
#[derive(Debug, Clone, PartialEq)]
pub struct PositionIds {
    pub axes: usize,
    pub data: Vec<f32>,
}

impl PositionIds {
    pub fn new(axes: usize, data: Vec<f32>) -> Result<PositionIds> {
        if axes == 0 || data.len() % axes != 0 {
            return Err(Error::shape("position ids", format!("{} values do not form rows of {axes} axes", data.len())));
        }
        Ok(PositionIds { axes, data })
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.axes
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.axes..(i + 1) * self.axes]
    }

    /// Concatenate along tokens.
    pub fn concat(parts: &[&PositionIds]) -> Result<PositionIds> {
        let axes = parts.first().map_or(4, |p| p.axes);
        if parts.iter().any(|p| p.axes != axes) {
            return Err(Error::shape("position ids", "cannot concatenate ids with different axis counts"));
        }
        PositionIds::new(axes, parts.iter().flat_map(|p| p.data.iter().copied()).collect())
    }

    /// Text tokens: (0, 0, 0, k) for k in 0..len (diffusers `_prepare_text_ids`).
    pub fn text(len: usize) -> PositionIds {
        PositionIds { axes: 4, data: (0..len).flat_map(|k| [0.0, 0.0, 0.0, k as f32]).collect() }
    }

    /// Image tokens of an h×w grid in row-major order: (t, row, col, 0).
    pub fn image(t: f32, h: usize, w: usize) -> PositionIds {
        PositionIds {
            axes: 4,
            data: (0..h).flat_map(|r| (0..w).flat_map(move |c| [t, r as f32, c as f32, 0.0])).collect(),
        }
    }
}

/// FLUX 4-axis interleaved RoPE: pair m of axis a rotates by pos[a] · theta^(-2j/d_a).
/// Angles and cos/sin in f64, stored as f32, like diffusers' `Flux2PosEmbed`.
pub fn flux_tables(ids: &PositionIds, axes_dims: &[usize], theta: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    if ids.axes != axes_dims.len() {
        return Err(Error::shape("rope", format!("ids have {} axes, the model {}", ids.axes, axes_dims.len())));
    }
    let pairs: usize = axes_dims.iter().sum::<usize>() / 2;
    let freqs: Vec<(usize, f64)> = axes_dims
        .iter()
        .enumerate()
        .flat_map(|(a, &d)| (0..d / 2).map(move |j| (a, 1.0 / theta.powf((2 * j) as f64 / d as f64))))
        .collect();
    let mut cos = Vec::with_capacity(ids.len() * pairs);
    let mut sin = Vec::with_capacity(ids.len() * pairs);
    for i in 0..ids.len() {
        let pos = ids.row(i);
        for &(a, f) in &freqs {
            let angle = pos[a] as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((cos, sin))
}

/// Qwen rotate-half RoPE for positions 0..n: inv_freq and angles in f32 like transformers.
pub fn qwen_tables(n: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv_freq {
            let angle = f * p as f32;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}
