//! Step previews: a linear latent-to-RGB projection (ComfyUI's "latent2rgb"), fitted to the loaded
//! VAE by least squares, applied to the current x₀ estimate at 1/8 of the image's resolution.
//!
//! Why fitted at run time rather than shipped coefficients: the projection belongs to the VAE's
//! weights, and a fit from the model in use is right for every VAE the engine loads (the FLUX.2 VAE
//! of the 4B/9B models, the tiny test VAEs) without a table that could silently go stale. It costs
//! one decode of a 16×16 latent grid (256² pixels), once per process, and only when previews are
//! asked for.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::image_io::RgbImage;
use crate::model::vae::{unpatchify, Vae};
use crate::tensor::Tensor;

/// Latent grid side (packed tokens) of the fit's random latents.
const FIT_GRID: usize = 16;
/// Tokens per side sharing one random value in the fit's latents.
const SMOOTH: usize = 2;

/// RGB (in the decoder's [-1, 1]) ≈ `weights · z + bias` per VAE-latent pixel.
#[derive(Debug, Clone)]
pub struct LatentToRgb {
    /// `[3][channels + 1]`: the last column is the bias.
    pub weights: Vec<Vec<f64>>,
    /// Decoder pixels per latent pixel side (8 for FLUX.2).
    pub scale: usize,
    /// Share of the pixel variance the fit explains on its own samples (R²).
    pub r2: f64,
}

impl LatentToRgb {
    /// Least squares from one decode of random (normalised, then denormalised) latents: the
    /// features are the VAE latents at each latent pixel, the targets the mean colour of the
    /// decoded pixels it covers.
    pub fn fit(be: &dyn Backend, vae: &Vae, packed_channels: usize) -> Result<LatentToRgb> {
        let g = FIT_GRID;
        // Piecewise-constant random latents (2×2 tokens per value): flat regions decode to the
        // colours the projection must predict, where white noise decodes mostly to texture.
        let coarse = crate::rng::normal_vec(7, "flux2-latent2rgb", packed_channels * (g / SMOOTH) * (g / SMOOTH));
        let noise: Vec<f32> = (0..packed_channels * g * g)
            .map(|i| {
                let (c, y, x) = (i / (g * g), (i / g) % g, i % g);
                coarse[(c * (g / SMOOTH) + y / SMOOTH) * (g / SMOOTH) + x / SMOOTH]
            })
            .collect();
        let grid = be.upload(&Tensor::from_f32(noise, &[1, packed_channels, g, g])?, be.activation_dtype())?;
        let pixels = vae.decode_normalized(&grid)?.to_vec_f32()?;
        let z = unpatchify(be, &vae.denormalize(&grid)?)?;
        let (zc, zh, zw) = (z.dim(1), z.dim(2), z.dim(3));
        LatentToRgb::fit_samples(&z.to_vec_f32()?, zc, zh, zw, &pixels)
    }

    /// The least-squares fit itself: `z` `[zc, zh, zw]` latents, `pixels` `[3, H, W]` decoded
    /// (H = zh·scale, W = zw·scale).
    pub fn fit_samples(z: &[f32], zc: usize, zh: usize, zw: usize, pixels: &[f32]) -> Result<LatentToRgb> {
        let scale = ((pixels.len() / 3) as f64 / (zh * zw) as f64).sqrt().round() as usize;
        let (h, w) = (zh * scale, zw * scale);
        if scale == 0 || h * w * 3 != pixels.len() {
            return Err(Error::Other("latent2rgb fit: the decoder's output does not tile the latents".into()));
        }
        let n = zh * zw;
        let k = zc + 1;
        let feature = |i: usize, c: usize| if c == zc { 1.0 } else { z[c * n + i] as f64 };
        let target = |i: usize, ch: usize| {
            let (y, x) = (i / zw, i % zw);
            let mut s = 0.0;
            for dy in 0..scale {
                for dx in 0..scale {
                    s += pixels[ch * h * w + (y * scale + dy) * w + x * scale + dx] as f64;
                }
            }
            s / (scale * scale) as f64
        };
        // Normal equations (XᵀX + λI) β = Xᵀy, solved by Gaussian elimination with pivoting.
        let mut xtx = vec![vec![0.0; k]; k];
        for i in 0..n {
            for a in 0..k {
                let fa = feature(i, a);
                for b in 0..k {
                    xtx[a][b] += fa * feature(i, b);
                }
            }
        }
        let ridge = 1e-6 * (0..k).map(|a| xtx[a][a]).sum::<f64>() / k as f64;
        (0..k).for_each(|a| xtx[a][a] += ridge);
        let mut weights = Vec::with_capacity(3);
        let (mut ss_res, mut ss_tot) = (0.0, 0.0);
        for ch in 0..3 {
            let targets: Vec<f64> = (0..n).map(|i| target(i, ch)).collect();
            let xty: Vec<f64> = (0..k).map(|a| (0..n).map(|i| feature(i, a) * targets[i]).sum()).collect();
            let beta = solve(xtx.clone(), xty)?;
            let mean = targets.iter().sum::<f64>() / n as f64;
            for (i, t) in targets.iter().enumerate() {
                let p: f64 = (0..k).map(|a| beta[a] * feature(i, a)).sum();
                ss_res += (t - p).powi(2);
                ss_tot += (t - mean).powi(2);
            }
            weights.push(beta);
        }
        Ok(LatentToRgb { weights, scale, r2: 1.0 - ss_res / ss_tot.max(1e-30) })
    }

    /// The preview of normalised, packed latents `[1, 4z, h, w]`: a `2w × 2h` image.
    pub fn apply(&self, be: &dyn Backend, vae: &Vae, grid: &Tensor) -> Result<RgbImage> {
        let z = unpatchify(be, &vae.denormalize(grid)?)?;
        let (zc, zh, zw) = (z.dim(1), z.dim(2), z.dim(3));
        if zc + 1 != self.weights[0].len() {
            return Err(Error::shape(
                "preview",
                format!("{zc} latent channels for a fit of {}", self.weights[0].len() - 1),
            ));
        }
        let z = z.to_vec_f32()?;
        let n = zh * zw;
        let mut data = vec![0u8; 3 * n];
        for i in 0..n {
            for ch in 0..3 {
                let beta = &self.weights[ch];
                let v: f64 = beta[zc] + (0..zc).map(|c| beta[c] * z[c * n + i] as f64).sum::<f64>();
                data[i * 3 + ch] = ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Ok(RgbImage { width: zw, height: zh, data })
    }
}

fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let k = b.len();
    for col in 0..k {
        let pivot = (col..k).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap();
        if a[pivot][col].abs() < 1e-300 {
            return Err(Error::Other("latent2rgb fit: singular system".into()));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..k {
            let f = a[row][col] / a[col][col];
            for c in col..k {
                a[row][c] -= f * a[col][c];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; k];
    for row in (0..k).rev() {
        let s: f64 = (row + 1..k).map(|c| a[row][c] * x[c]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the decoder is linear per latent pixel, the fit recovers it exactly.
    #[test]
    fn a_linear_decoder_is_recovered() {
        let (zc, zh, zw, scale) = (6, 10, 12, 4);
        let z = crate::rng::normal_vec(3, "z", zc * zh * zw);
        let truth: Vec<Vec<f64>> =
            (0..3).map(|ch| (0..=zc).map(|c| ((ch * 7 + c * 3) % 5) as f64 * 0.1 - 0.2).collect()).collect();
        let (h, w) = (zh * scale, zw * scale);
        let mut pixels = vec![0f32; 3 * h * w];
        for ch in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let i = (y / scale) * zw + x / scale;
                    let v = truth[ch][zc] + (0..zc).map(|c| truth[ch][c] * z[c * zh * zw + i] as f64).sum::<f64>();
                    pixels[ch * h * w + y * w + x] = v as f32;
                }
            }
        }
        let fit = LatentToRgb::fit_samples(&z, zc, zh, zw, &pixels).unwrap();
        assert_eq!(fit.scale, scale);
        assert!(fit.r2 > 0.999_999, "{}", fit.r2);
        for ch in 0..3 {
            for c in 0..=zc {
                assert!((fit.weights[ch][c] - truth[ch][c]).abs() < 1e-4, "{ch} {c}: {:?}", fit.weights[ch]);
            }
        }
    }
}
