//! `flux2 compare A B`: how close two outputs are. Safetensors: per tensor, cosine similarity,
//! ‖a − b‖ / ‖b‖ and max |a − b| (B is the reference). PNG: mean absolute pixel error in /255.
//! `--max-rel`, `--min-cosine` or `--max-pixel-error` turn the report into a pass/fail gate.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image_io::RgbImage;
use crate::weights::WeightStore;

#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Output to check.
    pub a: PathBuf,
    /// Reference.
    pub b: PathBuf,
    /// Only these tensors (repeatable); default: every tensor both files hold.
    #[arg(long = "key")]
    pub keys: Vec<String>,
    #[arg(long)]
    pub max_rel: Option<f64>,
    #[arg(long)]
    pub min_cosine: Option<f64>,
    #[arg(long)]
    pub max_pixel_error: Option<f64>,
    /// Also count bitwise-equal values and the largest difference in bf16 ulps of the reference
    /// (kernel outputs of two backends, e.g. `selftest --dump` on a GPU and under the emulator).
    #[arg(long)]
    pub ulps: bool,
    /// Fail when a tensor differs by more than this many bf16 ulps somewhere (implies --ulps).
    #[arg(long)]
    pub max_ulps: Option<f64>,
}

/// Values equal to the bit, values within one bf16 ulp, and the largest |a − b| in units of the
/// bf16 spacing at b (large where b is a near-cancellation, however small |a − b| is).
pub fn ulp_distance(a: &[f32], b: &[f32]) -> (usize, usize, f64) {
    let (mut equal, mut within_one) = (0, 0);
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        if x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()) {
            equal += 1;
            within_one += 1;
            continue;
        }
        // bf16 keeps 8 significant bits: its spacing at |y| is 2^(exponent(y) - 7).
        let mag = (y.abs() as f64).max(f32::MIN_POSITIVE as f64);
        let ulp = 2f64.powi(mag.log2().floor() as i32 - 7);
        let d = if x.is_finite() && y.is_finite() { (*x as f64 - *y as f64).abs() / ulp } else { f64::INFINITY };
        within_one += (d <= 1.0) as usize;
        worst = worst.max(d);
    }
    (equal, within_one, worst)
}

/// Cosine similarity, relative L2 error (b as reference) and max absolute difference.
pub fn similarity(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    let (mut ab, mut aa, mut bb, mut dd, mut mx) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
        dd += (x - y) * (x - y);
        mx = mx.max((x - y).abs());
    }
    let cos = if aa == 0.0 && bb == 0.0 { 1.0 } else { ab / (aa.sqrt() * bb.sqrt()).max(1e-300) };
    (cos, (dd / bb.max(1e-300)).sqrt(), mx)
}

/// Thresholds must be numbers a value can be compared with: a NaN threshold would make every
/// comparison against it false, and a negative one cannot mean anything for these measures.
fn check_thresholds(args: &CompareArgs) -> Result<()> {
    let thresholds = [
        ("--min-cosine", args.min_cosine),
        ("--max-rel", args.max_rel),
        ("--max-pixel-error", args.max_pixel_error),
        ("--max-ulps", args.max_ulps),
    ];
    for (flag, t) in thresholds {
        if let Some(t) = t.filter(|t| t.is_nan() || *t < 0.0) {
            return Err(Error::InvalidArgument(format!("{flag} {t}: must be a number at least 0")));
        }
    }
    Ok(())
}

/// How many values are NaN or infinite: such an output never passes a comparison, whatever the
/// thresholds (NaN slips through any `>` test, and the other side may hold the same NaNs).
fn non_finite(v: &[f32]) -> usize {
    v.iter().filter(|x| !x.is_finite()).count()
}

pub fn run(args: &CompareArgs) -> Result<()> {
    check_thresholds(args)?;
    let is_png = |p: &PathBuf| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let mut failures = Vec::new();
    if is_png(&args.a) || is_png(&args.b) {
        let (a, b) = (RgbImage::load(&args.a)?, RgbImage::load(&args.b)?);
        if (a.width, a.height) != (b.width, b.height) {
            return Err(Error::InvalidArgument(format!(
                "sizes differ: {}x{} vs {}x{}",
                a.width, a.height, b.width, b.height
            )));
        }
        let mad =
            a.data.iter().zip(&b.data).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.data.len() as f64;
        let max = a.data.iter().zip(&b.data).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap_or(0);
        println!("pixels: mean abs error {mad:.4}/255, max {max}/255 ({}x{})", a.width, a.height);
        if args.max_pixel_error.is_some_and(|t| mad > t) {
            failures.push(format!("mean pixel error {mad:.4} > {}", args.max_pixel_error.unwrap()));
        }
    } else {
        let (a, b) = (WeightStore::open(&args.a)?, WeightStore::open(&args.b)?);
        let mut keys: Vec<String> = if args.keys.is_empty() {
            a.keys().filter(|k| b.contains(k)).map(str::to_string).collect()
        } else {
            args.keys.clone()
        };
        keys.sort();
        if keys.is_empty() {
            return Err(Error::InvalidArgument("the files share no tensor names".into()));
        }
        for k in keys {
            let (x, y) = (super::read_f32(&a, &k)?, super::read_f32(&b, &k)?);
            if x.shape() != y.shape() {
                failures.push(format!("{k}: shape {:?} vs {:?}", x.shape(), y.shape()));
                continue;
            }
            let (xv, yv) = (x.to_vec_f32()?, y.to_vec_f32()?);
            for (side, v) in [("A", &xv), ("B", &yv)] {
                let n = non_finite(v);
                if n > 0 {
                    failures.push(format!("{k}: {side} holds {n} NaN or infinite values"));
                }
            }
            let (cos, rel, max) = similarity(&xv, &yv);
            if args.ulps || args.max_ulps.is_some() {
                let (equal, within_one, ulps) = ulp_distance(&xv, &yv);
                println!(
                    "{k}: {equal} of {} bitwise equal, {within_one} within 1 bf16 ulp, max {ulps:.1} ulps, cosine {cos:.6}  {:?}",
                    xv.len(),
                    x.shape()
                );
                if args.max_ulps.is_some_and(|t| !(ulps <= t)) {
                    failures.push(format!("{k}: {ulps:.1} ulps > {}", args.max_ulps.unwrap()));
                }
            } else {
                println!("{k}: cosine {cos:.6}  rel_l2 {rel:.3e}  max_abs {max:.3e}  {:?}", x.shape());
            }
            if args.max_rel.is_some_and(|t| !(rel <= t)) {
                failures.push(format!("{k}: rel_l2 {rel:.3e} > {}", args.max_rel.unwrap()));
            }
            if args.min_cosine.is_some_and(|t| !(cos >= t)) {
                failures.push(format!("{k}: cosine {cos:.6} < {}", args.min_cosine.unwrap()));
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Other(format!("comparison failed: {}", failures.join("; "))))
    }
}
