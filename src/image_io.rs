//! Image files in and out: decoding references, PIL-exact Lanczos resizing and centre cropping
//! (diffusers' Flux2 image processor), tensor conversion, and PNG writing with the generation
//! parameters in text chunks.

use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Decode PNG/JPEG/WebP; other colour types are converted to RGB (alpha dropped, as PIL's
    /// `convert("RGB")` does).
    pub fn load(path: &Path) -> Result<RgbImage> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        RgbImage::decode(&bytes, &path.display().to_string())
    }

    /// Decode image bytes (PNG/JPEG/WebP); `what` names them in errors (a path, a form field).
    pub fn decode(bytes: &[u8], what: &str) -> Result<RgbImage> {
        let img = image::load_from_memory(bytes)
            .map_err(|e| Error::InvalidArgument(format!("{what}: cannot decode the image: {e}")))?;
        let rgb = img.to_rgb8();
        Ok(RgbImage { width: rgb.width() as usize, height: rgb.height() as usize, data: rgb.into_raw() })
    }

    /// An inpainting mask as a white-means-repaint image. OpenAI's convention first: a mask with an
    /// alpha channel marks the area to edit by transparency (alpha 0 → white); without alpha, the
    /// grey level is the mask (diffusers' convention).
    pub fn decode_mask(bytes: &[u8], what: &str) -> Result<RgbImage> {
        let img = image::load_from_memory(bytes)
            .map_err(|e| Error::InvalidArgument(format!("{what}: cannot decode the image: {e}")))?;
        if !img.color().has_alpha() {
            return RgbImage::decode(bytes, what);
        }
        let rgba = img.to_rgba8();
        let data = rgba.pixels().flat_map(|p| if p.0[3] == 0 { [255u8; 3] } else { [0u8; 3] }).collect();
        Ok(RgbImage { width: rgba.width() as usize, height: rgba.height() as usize, data })
    }

    /// The PNG file's bytes, with text chunks as [`RgbImage::save_png`] writes them.
    pub fn png_bytes(&self, text: &[(&str, String)]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_png(&mut out, Path::new("<memory>"), text)?;
        Ok(out)
    }

    /// Centre crop to `w × h` (offsets rounded down, as PIL `crop` with integer division).
    pub fn center_crop(&self, w: usize, h: usize) -> RgbImage {
        let (left, top) = ((self.width - w) / 2, (self.height - h) / 2);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in top..top + h {
            data.extend_from_slice(&self.data[(y * self.width + left) * 3..(y * self.width + left + w) * 3]);
        }
        RgbImage { width: w, height: h, data }
    }

    /// `Image.resize((w, h), LANCZOS)` with Pillow's exact arithmetic: separable passes
    /// (horizontal first), support scaled by the reduction factor, 22-bit fixed-point weights.
    pub fn resize_lanczos(&self, w: usize, h: usize) -> RgbImage {
        self.resize_lanczos_box(w, h, (0, 0, self.width, self.height))
    }

    /// `Image.resize((w, h), LANCZOS, box=(x0, y0, x1, y1))`: the box (possibly empty along an
    /// axis, as diffusers' fill resize uses it) is the source region; a pass is skipped when
    /// Pillow skips it (same size, box covering the axis).
    pub fn resize_lanczos_box(&self, w: usize, h: usize, bx: (usize, usize, usize, usize)) -> RgbImage {
        let mut img = self.clone();
        if w != img.width || bx.0 != 0 || bx.2 != img.width {
            img = resample_pass(&img, w, true, (bx.0 as f64, bx.2 as f64));
        }
        if h != img.height || bx.1 != 0 || bx.3 != img.height {
            img = resample_pass(&img, h, false, (bx.1 as f64, bx.3 as f64));
        }
        img
    }

    /// `Image.crop((x0, y0, x1, y1))`: pixels outside the image are black, as in Pillow.
    pub fn crop(&self, x0: i64, y0: i64, x1: i64, y1: i64) -> RgbImage {
        let (w, h) = ((x1 - x0).max(0) as usize, (y1 - y0).max(0) as usize);
        let mut data = vec![0u8; w * h * 3];
        for y in 0..h {
            let sy = y0 + y as i64;
            if sy < 0 || sy >= self.height as i64 {
                continue;
            }
            for x in 0..w {
                let sx = x0 + x as i64;
                if sx >= 0 && sx < self.width as i64 {
                    let s = (sy as usize * self.width + sx as usize) * 3;
                    data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&self.data[s..s + 3]);
                }
            }
        }
        RgbImage { width: w, height: h, data }
    }

    /// Paste `src` with its top-left corner at (x, y) (clipped to this image), as Pillow's
    /// `paste(src, (x, y))` without a mask.
    pub fn paste(&mut self, src: &RgbImage, x: i64, y: i64) {
        for sy in 0..src.height {
            let dy = y + sy as i64;
            if dy < 0 || dy >= self.height as i64 {
                continue;
            }
            for sx in 0..src.width {
                let dx = x + sx as i64;
                if dx >= 0 && dx < self.width as i64 {
                    let d = (dy as usize * self.width + dx as usize) * 3;
                    let s = (sy * src.width + sx) * 3;
                    self.data[d..d + 3].copy_from_slice(&src.data[s..s + 3]);
                }
            }
        }
    }

    /// Pillow's `convert("L")`: `(299·R + 587·G + 114·B) / 1000` in its 16-bit fixed point.
    pub fn to_luma(&self) -> Vec<u8> {
        self.data
            .chunks_exact(3)
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
            .collect()
    }

    /// `[1, 3, H, W]` f32 in [-1, 1] (`x / 255 · 2 - 1`).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let plane = self.width * self.height;
        let mut v = vec![0f32; 3 * plane];
        for (i, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                v[c * plane + i] = (px[c] as f32 / 255.0) * 2.0 - 1.0;
            }
        }
        Tensor::from_f32(v, &[1, 3, self.height, self.width])
    }

    /// diffusers' postprocess of one `[3, H, W]` decoder output: `clamp(x/2 + 0.5, 0, 1)`, then
    /// `round(· 255)` with ties to even (numpy).
    pub fn from_decoded(values: &[f32], width: usize, height: usize) -> Result<RgbImage> {
        let plane = width * height;
        if values.len() != 3 * plane {
            return Err(Error::shape("image", format!("{} values for a {width}x{height} RGB image", values.len())));
        }
        let mut data = vec![0u8; 3 * plane];
        for i in 0..plane {
            for c in 0..3 {
                let v = (values[c * plane + i] * 0.5 + 0.5).clamp(0.0, 1.0);
                data[i * 3 + c] = (v * 255.0).round_ties_even() as u8;
            }
        }
        Ok(RgbImage { width, height, data })
    }

    /// Write a PNG with text chunks (keyword, text): tEXt when the text is Latin-1, else iTXt.
    /// Atomic: a failed write leaves any file already at `path` as it was.
    pub fn save_png(&self, path: &Path, text: &[(&str, String)]) -> Result<()> {
        crate::output_file::write_with(path, |file| self.encode_png(file, path, text))
    }

    fn encode_png(&self, out: impl std::io::Write, path: &Path, text: &[(&str, String)]) -> Result<()> {
        let png_err = |e: png::EncodingError| Error::io(path, std::io::Error::other(e.to_string()));
        let mut enc = png::Encoder::new(out, self.width as u32, self.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            if value.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(key.to_string(), value.clone()).map_err(png_err)?;
            } else {
                enc.add_itxt_chunk(key.to_string(), value.clone()).map_err(png_err)?;
            }
        }
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(&self.data).map_err(png_err)?;
        writer.finish().map_err(png_err)
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / LANCZOS_SUPPORT)
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first input
/// index and the fixed-point weights.
fn coefficients(in_size: usize, (in0, in1): (f64, f64), out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = in0 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = (((center + support + 0.5) as i64).min(in_size as i64) as usize).saturating_sub(xmin);
            let mut k: Vec<f64> = (0..xmax).map(|x| lanczos((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let fixed = k
                .iter()
                .map(|&v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (s - 0.5) as i32
                    } else {
                        (s + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resample_pass(img: &RgbImage, out: usize, horizontal: bool, span: (f64, f64)) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let coeffs = coefficients(if horizontal { w } else { h }, span, out);
    let (ow, oh) = if horizontal { (out, h) } else { (w, out) };
    let mut data = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = &coeffs[if horizontal { x } else { y }];
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kv) in k.iter().enumerate() {
                    let src = if horizontal { (y * w + start + i) * 3 + c } else { ((start + i) * w + x) * 3 + c };
                    ss += img.data[src] as i64 * kv as i64;
                }
                data[(y * ow + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage { width: ow, height: oh, data }
}
