//! Inpainting and img2img inputs, prepared as diffusers 0.42.1 `Flux2KleinInpaintPipeline` does:
//! the init image resized to the output size, the mask binarised and bilinearly reduced to one
//! value per latent token, the strength turned into a first step, and `padding_mask_crop` (crop
//! region around the mask, fill resize, overlay of the result onto the original).

use crate::error::{Error, Result};
use crate::image_io::RgbImage;

/// diffusers' default `strength`.
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// The first schedule index a run with `strength` starts from (`get_timesteps`:
/// `t_start = int(max(steps - min(steps·strength, steps), 0))`, in Python floats); the run makes
/// `steps - t_start` steps.
pub fn start_step(steps: usize, strength: f64) -> Result<usize> {
    check_strength(strength)?;
    let n = steps as f64;
    let init = (n * strength).min(n);
    let t_start = (n - init).max(0.0) as usize;
    if t_start >= steps {
        return Err(Error::InvalidArgument(format!(
            "--strength {strength} with {steps} steps leaves no step to run (steps·strength must be at least 1 \
             after diffusers' rounding); raise --strength or --steps"
        )));
    }
    Ok(t_start)
}

pub fn check_strength(strength: f64) -> Result<()> {
    if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        return Err(Error::InvalidArgument(format!("--strength must be in (0, 1]; got {strength}")));
    }
    Ok(())
}

/// The output size for an init image: its size after the 1024² area cap, floored to `multiple`.
pub fn init_size(w: usize, h: usize, multiple: usize) -> (usize, usize) {
    crate::pipeline::reference_size(w, h, multiple)
}

/// `VaeImageProcessor.get_crop_region(mask, width, height, pad)`: the box around every non-zero
/// mask pixel, padded, then grown to the aspect ratio `width / height` (x1, y1, x2, y2).
pub fn crop_region(mask: &RgbImage, width: usize, height: usize, pad: usize) -> (i64, i64, i64, i64) {
    let luma = mask.to_luma();
    let (w, h) = (mask.width, mask.height);
    let col_empty = |x: usize| (0..h).all(|y| luma[y * w + x] == 0);
    let row_empty = |y: usize| (0..w).all(|x| luma[y * w + x] == 0);
    let crop_left = (0..w).take_while(|&x| col_empty(x)).count() as i64;
    let crop_right = (0..w).rev().take_while(|&x| col_empty(x)).count() as i64;
    let crop_top = (0..h).take_while(|&y| row_empty(y)).count() as i64;
    let crop_bottom = (0..h).rev().take_while(|&y| row_empty(y)).count() as i64;
    let (wi, hi, pad) = (w as i64, h as i64, pad as i64);
    let (mut x1, mut y1) = ((crop_left - pad).max(0), (crop_top - pad).max(0));
    let (mut x2, mut y2) = ((wi - crop_right + pad).min(wi), (hi - crop_bottom + pad).min(hi));
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = width as f64 / height as f64;
    if ratio_crop > ratio_processing {
        let desired_height = (x2 - x1) as f64 / ratio_processing;
        let diff = (desired_height - (y2 - y1) as f64) as i64;
        y1 -= diff.div_euclid(2);
        y2 += diff - diff.div_euclid(2);
        if y2 >= hi {
            let d = y2 - hi;
            y2 -= d;
            y1 -= d;
        }
        if y1 < 0 {
            y2 -= y1;
            y1 = 0;
        }
        if y2 >= hi {
            y2 = hi;
        }
    } else {
        let desired_width = (y2 - y1) as f64 * ratio_processing;
        let diff = (desired_width - (x2 - x1) as f64) as i64;
        x1 -= diff.div_euclid(2);
        x2 += diff - diff.div_euclid(2);
        if x2 >= wi {
            let d = x2 - wi;
            x2 -= d;
            x1 -= d;
        }
        if x1 < 0 {
            x2 -= x1;
            x1 = 0;
        }
        if x2 >= wi {
            x2 = wi;
        }
    }
    (x1, y1, x2, y2)
}

/// `VaeImageProcessor._resize_and_fill`: keep the aspect ratio, centre, and fill the bands with
/// the stretched edge rows/columns (Pillow box resizes of the edges).
pub fn resize_and_fill(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let ratio = width as f64 / height as f64;
    let src_ratio = img.width as f64 / img.height as f64;
    let src_w = if ratio < src_ratio { width } else { img.width * height / img.height };
    let src_h = if ratio >= src_ratio { height } else { img.height * width / img.width };
    let resized = img.resize_lanczos(src_w, src_h);
    let mut res = RgbImage { width, height, data: vec![0; width * height * 3] };
    let (ox, oy) = ((width / 2) as i64 - (src_w / 2) as i64, (height / 2) as i64 - (src_h / 2) as i64);
    res.paste(&resized, ox, oy);
    if ratio < src_ratio {
        let fill = (height / 2) as i64 - (src_h / 2) as i64;
        if fill > 0 {
            let f = fill as usize;
            res.paste(&resized.resize_lanczos_box(width, f, (0, 0, width, 0)), 0, 0);
            let bottom = resized.resize_lanczos_box(width, f, (0, resized.height, width, resized.height));
            res.paste(&bottom, 0, fill + src_h as i64);
        }
    } else if ratio > src_ratio {
        let fill = (width / 2) as i64 - (src_w / 2) as i64;
        if fill > 0 {
            let f = fill as usize;
            res.paste(&resized.resize_lanczos_box(f, height, (0, 0, 0, height)), 0, 0);
            let right = resized.resize_lanczos_box(f, height, (resized.width, 0, resized.width, height));
            res.paste(&right, fill + src_w as i64, 0);
        }
    }
    res
}

/// The mask processor's output for an already sized mask: luma / 255, binarised at 0.5
/// (`do_binarize`), one value per pixel.
pub fn binarize(mask: &RgbImage) -> Vec<f32> {
    mask.to_luma().iter().map(|&v| if v as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 }).collect()
}

/// `F.interpolate(mask, size=(h, w), mode="bilinear")` (align_corners=False, no antialias) of an
/// `ih × iw` mask, in row-major token order (what `_pack_latents` makes of it).
pub fn mask_tokens(mask: &[f32], iw: usize, ih: usize, w: usize, h: usize) -> Vec<f32> {
    let axis = |inp: usize, out: usize, o: usize| {
        let scale = inp as f32 / out as f32;
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(inp - 1);
        let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        (i0, i1, 1.0 - l1, l1)
    };
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let (y0, y1, h0, h1) = axis(ih, h, y);
        for x in 0..w {
            let (x0, x1, w0, w1) = axis(iw, w, x);
            let v = |yy: usize, xx: usize| mask[yy * iw + xx];
            out.push(h0 * (w0 * v(y0, x0) + w1 * v(y0, x1)) + h1 * (w0 * v(y1, x0) + w1 * v(y1, x1)));
        }
    }
    out
}

/// Pillow's `DIV255` rounding.
fn div255(v: u32) -> u32 {
    let t = v + 128;
    ((t >> 8) + t) >> 8
}

/// `VaeImageProcessor.apply_overlay(mask, original, generated, crop)` with the Flux2 processor's
/// crop-only `_resize_and_crop`: the generated image is centre-cropped to the crop box, placed
/// there on black, and the original is composited over it where the mask is black (alpha
/// `255 - mask`, through Pillow's premultiplied paste and `alpha_composite`).
pub fn apply_overlay(
    mask: &RgbImage,
    original: &RgbImage,
    generated: &RgbImage,
    crop: (i64, i64, i64, i64),
) -> RgbImage {
    let (width, height) = (original.width, original.height);
    let (x, y, x2, y2) = crop;
    let (cw, ch) = ((x2 - x) as usize, (y2 - y) as usize);
    let cropped = generated.crop(
        (generated.width as i64 - cw as i64).div_euclid(2),
        (generated.height as i64 - ch as i64).div_euclid(2),
        (generated.width as i64 - cw as i64).div_euclid(2) + cw as i64,
        (generated.height as i64 - ch as i64).div_euclid(2) + ch as i64,
    );
    let mut base = RgbImage { width, height, data: vec![0; width * height * 3] };
    base.paste(&cropped, x, y);
    let luma = mask.to_luma();
    let mut out = base.clone();
    for i in 0..width * height {
        // init_image_masked: RGBa (premultiplied) pasted through `invert(mask)`, then RGBA.
        let a = 255 - luma[i] as u32;
        let pm: Vec<u32> = (0..3).map(|c| div255(original.data[i * 3 + c] as u32 * a)).collect();
        let sa = div255(255 * a);
        if sa == 0 {
            continue;
        }
        let src: Vec<u32> = if sa == 255 { pm } else { pm.iter().map(|&v| ((255 * v) / sa).min(255)).collect() };
        // alpha_composite(dst = generated on black, opaque; src = masked original).
        const PREC: u32 = 7;
        let blend = 255 * (255 - sa);
        let outa255 = sa * 255 + blend;
        let coef1 = (sa as u64 * 255 * 255 * (1 << PREC) / outa255 as u64) as u32;
        let coef2 = 255 * (1 << PREC) - coef1;
        for c in 0..3 {
            let t = src[c] * coef1 + base.data[i * 3 + c] as u32 * coef2 + (0x80 << PREC);
            out.data[i * 3 + c] = ((((t >> 8) + t) >> 8) >> PREC) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_rounds_the_step_count_as_diffusers() {
        assert_eq!(start_step(4, 1.0).unwrap(), 0);
        assert_eq!(start_step(4, 0.6).unwrap(), 1); // 4 - 2.4 = 1.6 -> 1
        assert_eq!(start_step(4, 0.5).unwrap(), 2);
        assert_eq!(start_step(4, 0.1).unwrap(), 3);
        assert_eq!(start_step(10, 0.7).unwrap(), 3); // Python: 10·0.7 = 7.0
        assert_eq!(start_step(3, 0.3).unwrap(), 2); // 3 - 0.8999999999999999 -> 2
        assert!(start_step(4, 0.0).is_err());
        assert!(start_step(4, 1.5).is_err());
        assert!(start_step(4, f64::NAN).is_err());
        assert!(start_step(4, 1e-300).is_err());
    }

    #[test]
    fn mask_reduction_averages_the_centre_pixels() {
        // 32x16 mask, left half white: tokens 2x1.
        let mut m = vec![0f32; 32 * 16];
        for y in 0..16 {
            for x in 0..16 {
                m[y * 32 + x] = 1.0;
            }
        }
        assert_eq!(mask_tokens(&m, 32, 16, 2, 1), vec![1.0, 0.0]);
        // An edge between pixels 7 and 8 of the first token: half.
        let mut m = vec![0f32; 16 * 16];
        for y in 0..16 {
            for x in 0..8 {
                m[y * 16 + x] = 1.0;
            }
        }
        assert_eq!(mask_tokens(&m, 16, 16, 1, 1), vec![0.5]);
    }

    #[test]
    fn crop_region_grows_to_the_aspect_ratio() {
        let mut mask = RgbImage { width: 64, height: 64, data: vec![0; 64 * 64 * 3] };
        for y in 20..30 {
            for x in 10..40 {
                let i = (y * 64 + x) * 3;
                mask.data[i..i + 3].copy_from_slice(&[255, 255, 255]);
            }
        }
        // Box x 10..40, y 20..30, pad 4 -> 6..44 x 16..34 (38 x 18), grown to square: 38 x 38.
        assert_eq!(crop_region(&mask, 64, 64, 4), (6, 6, 44, 44));
    }
}
