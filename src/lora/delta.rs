//! One module's weight delta ΔW `[out, in]` from its factors, with the scale each trainer
//! defines:
//! - LoRA (kohya, LyCORIS, diffusers with `.alpha` keys): `alpha / rank`, rank = rows of the down
//!   factor; no alpha: 1 (kohya's default alpha is the rank). PEFT files keep alpha in the adapter
//!   config (`lora_adapter_metadata`), passed in as `peft_alpha`.
//! - LoKr (LyCORIS `diff_weight`): `kron(w1, w2) · alpha / rank`, rank = columns of `w1_a` when w1
//!   is factorised, else of `w2_a`; both full: scale 1 (alpha ignored).
//! - LoHa: `(w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / rank`, rank = rows of `w1_b`.
//!
//! Rows are computed on demand, so a merge never holds more than the rows it adds.

use std::ops::Range;

use super::keys::{Algo, Module};
use crate::error::{Error, Result};
use crate::weights::WeightStore;

/// A row-major f32 matrix.
#[derive(Debug, Clone)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub v: Vec<f32>,
}

impl Mat {
    fn row(&self, i: usize) -> &[f32] {
        &self.v[i * self.cols..(i + 1) * self.cols]
    }

    /// `self · other`.
    fn matmul(&self, other: &Mat) -> Mat {
        let mut v = vec![0f32; self.rows * other.cols];
        for i in 0..self.rows {
            let out = &mut v[i * other.cols..(i + 1) * other.cols];
            for (k, &a) in self.row(i).iter().enumerate() {
                for (o, &b) in out.iter_mut().zip(other.row(k)) {
                    *o += a * b;
                }
            }
        }
        Mat { rows: self.rows, cols: other.cols, v }
    }
}

/// The factors of one module, shape-checked against the linear they adapt.
#[derive(Debug, Clone)]
pub enum Factors {
    /// ΔW = up `[out, r]` · down `[r, in]`.
    LowRank { down: Mat, up: Mat },
    /// ΔW = kron(w1 `[a, b]`, w2 `[c, d]`), out = a·c, in = b·d.
    Kron { w1: Mat, w2: Mat },
    /// ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b).
    Hadamard { w1a: Mat, w1b: Mat, w2a: Mat, w2b: Mat },
}

/// A module's factors and its trainer-defined scale (the user's strength not included).
#[derive(Debug, Clone)]
pub struct Delta {
    pub factors: Factors,
    pub scale: f32,
    pub rank: usize,
    pub alpha: Option<f32>,
}

struct Reader<'a> {
    store: &'a WeightStore,
    module: &'a Module,
    target: &'a str,
}

impl Reader<'_> {
    fn key(&self, role: &str) -> Result<&str> {
        self.module.tensors.get(role).map(String::as_str).ok_or_else(|| {
            Error::config(
                self.store.origin(),
                format!("{} module `{}` has no `{role}` tensor", self.module.algo.name(), self.module.path),
            )
        })
    }

    fn has(&self, role: &str) -> bool {
        self.module.tensors.contains_key(role)
    }

    /// A 2-D factor; `want` holds the dims that must match (None: free, e.g. the rank).
    fn mat(&self, role: &str, want: [Option<usize>; 2]) -> Result<Mat> {
        let key = self.key(role)?;
        let t = self.store.get(key)?;
        let shape = t.shape().to_vec();
        let fits = shape.len() == 2 && want.iter().zip(&shape).all(|(w, &g)| w.is_none_or(|w| w == g));
        if !fits {
            return Err(self.wrong_shape(key, &want, &shape));
        }
        Ok(Mat { rows: shape[0], cols: shape[1], v: t.to_f32()? })
    }

    fn wrong_shape(&self, key: &str, want: &[Option<usize>], got: &[usize]) -> Error {
        let want: Vec<String> = want.iter().map(|w| w.map_or("rank".to_string(), |w| w.to_string())).collect();
        Error::config(
            self.store.origin(),
            format!(
                "`{key}` has shape {got:?}, expected [{}] for `{}` (a LoRA for another model?)",
                want.join(", "),
                self.target
            ),
        )
    }

    fn alpha(&self) -> Result<Option<f32>> {
        if !self.has("alpha") {
            return Ok(None);
        }
        let key = self.key("alpha")?;
        let v = self.store.get(key)?.to_f32()?;
        match v[..] {
            [a] if a.is_finite() => Ok(Some(a)),
            _ => Err(Error::config(self.store.origin(), format!("`{key}` must be one finite number, got {v:?}"))),
        }
    }
}

impl Delta {
    /// Read and check one module's factors for a linear `[out, inp]` (named `target` in errors).
    pub fn read(
        store: &WeightStore,
        module: &Module,
        target: &str,
        out: usize,
        inp: usize,
        peft: Option<super::PeftConfig>,
    ) -> Result<Delta> {
        let r = Reader { store, module, target };
        let alpha = r.alpha()?;
        let d = match module.algo {
            Algo::Lora => {
                let down = r.mat("down", [None, Some(inp)])?;
                let rank = down.rows;
                let up = r.mat("up", [Some(out), Some(rank)])?;
                let scale = match (alpha, peft) {
                    (None, Some(p)) if p.rslora && rank > 0 => p.alpha / (rank as f32).sqrt(),
                    (None, Some(p)) => ratio(Some(p.alpha), rank),
                    (a, _) => ratio(a, rank),
                };
                Delta { factors: Factors::LowRank { down, up }, scale, rank, alpha: alpha.or(peft.map(|p| p.alpha)) }
            }
            Algo::LoKr => {
                let w1 = if r.has("w1") { r.mat("w1", [None, None])? } else { product(&r, "w1_a", "w1_b")? };
                let w2 = if r.has("w2") { r.mat("w2", [None, None])? } else { product(&r, "w2_a", "w2_b")? };
                if w1.rows * w2.rows != out || w1.cols * w2.cols != inp {
                    return Err(Error::config(
                        store.origin(),
                        format!(
                            "LoKr module `{}`: kron(w1 [{}, {}], w2 [{}, {}]) is [{}, {}], expected [{out}, {inp}] \
                             for `{target}` (a LoRA for another model?)",
                            module.path,
                            w1.rows,
                            w1.cols,
                            w2.rows,
                            w2.cols,
                            w1.rows * w2.rows,
                            w1.cols * w2.cols
                        ),
                    ));
                }
                // LyCORIS: the rank of the first factorised side; both full matrices: scale 1.
                let rank = [("w1_a", "w1"), ("w2_a", "w2")]
                    .iter()
                    .find(|(f, full)| r.has(f) && !r.has(full))
                    .map(|(f, _)| store.get(&module.tensors[*f]).map(|t| t.shape()[1]))
                    .transpose()?;
                let scale = rank.map_or(1.0, |rank| ratio(alpha, rank));
                Delta { factors: Factors::Kron { w1, w2 }, scale, rank: rank.unwrap_or(0), alpha }
            }
            Algo::LoHa => {
                let w1b = r.mat("hada_w1_b", [None, Some(inp)])?;
                let w1a = r.mat("hada_w1_a", [Some(out), Some(w1b.rows)])?;
                let w2b = r.mat("hada_w2_b", [None, Some(inp)])?;
                let w2a = r.mat("hada_w2_a", [Some(out), Some(w2b.rows)])?;
                let rank = w1b.rows;
                Delta { factors: Factors::Hadamard { w1a, w1b, w2a, w2b }, scale: ratio(alpha, rank), rank, alpha }
            }
        };
        Ok(d)
    }

    /// Rows `rows` of `scale · ΔW`, row-major `[rows.len(), in]`.
    pub fn rows(&self, rows: Range<usize>, scale: f32) -> Vec<f32> {
        let s = scale * self.scale;
        match &self.factors {
            Factors::LowRank { down, up } => {
                let mut out = vec![0f32; rows.len() * down.cols];
                for (o, i) in out.chunks_mut(down.cols).zip(rows) {
                    for (k, &u) in up.row(i).iter().enumerate() {
                        let u = u * s;
                        for (x, &d) in o.iter_mut().zip(down.row(k)) {
                            *x += u * d;
                        }
                    }
                }
                out
            }
            Factors::Kron { w1, w2 } => {
                let inp = w1.cols * w2.cols;
                let mut out = vec![0f32; rows.len() * inp];
                for (o, i) in out.chunks_mut(inp).zip(rows) {
                    let (a, c) = (w1.row(i / w2.rows), w2.row(i % w2.rows));
                    for (blk, &x1) in o.chunks_mut(w2.cols).zip(a) {
                        for (x, &x2) in blk.iter_mut().zip(c) {
                            *x = x1 * x2 * s;
                        }
                    }
                }
                out
            }
            Factors::Hadamard { w1a, w1b, w2a, w2b } => {
                let inp = w1b.cols;
                let mut out = vec![0f32; rows.len() * inp];
                for (o, i) in out.chunks_mut(inp).zip(rows) {
                    let p1 = Mat { rows: 1, cols: w1a.cols, v: w1a.row(i).to_vec() }.matmul(w1b);
                    let p2 = Mat { rows: 1, cols: w2a.cols, v: w2a.row(i).to_vec() }.matmul(w2b);
                    for ((x, a), b) in o.iter_mut().zip(&p1.v).zip(&p2.v) {
                        *x = a * b * s;
                    }
                }
                out
            }
        }
    }

    /// The size of the delta's low-rank form, if it has one (LoRA): `[r, in]` and `[out, r]`.
    pub fn low_rank(&self) -> Option<(&Mat, &Mat)> {
        match &self.factors {
            Factors::LowRank { down, up } => Some((down, up)),
            _ => None,
        }
    }
}

/// `alpha / rank`, or 1 without an alpha (or with alpha 0, which LyCORIS reads as "the rank").
fn ratio(alpha: Option<f32>, rank: usize) -> f32 {
    match alpha {
        Some(a) if a != 0.0 && rank > 0 => a / rank as f32,
        _ => 1.0,
    }
}

fn product(r: &Reader, a: &str, b: &str) -> Result<Mat> {
    let fa = r.mat(a, [None, None])?;
    let fb = r.mat(b, [Some(fa.cols), None])?;
    Ok(fa.matmul(&fb))
}
