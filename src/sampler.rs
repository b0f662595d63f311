//! Flow-matching Euler sampler (spec §7): empirical mu, exponential time shift, sigmas with
//! diffusers' float32 arithmetic, and the timestep values the DiT sees.

use std::path::Path;

use serde::Deserialize;

use crate::dtype::{round_through, DType};
use crate::error::{Error, Result};
use crate::model::positive_finite;

/// `FlowMatchEulerDiscreteScheduler` settings that shape the schedule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: f64,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
    pub shift_terminal: Option<f64>,
    /// FLUX.1's resolution-dependent shift bounds; the klein schedule uses the empirical mu
    /// instead, so they are only checked, not used.
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub invert_sigmas: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub stochastic_sampling: bool,
}

/// The FLUX.2 scheduler config (dynamic exponential shifting; mu from the image size).
impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000.0,
            shift: 3.0,
            use_dynamic_shifting: true,
            time_shift_type: "exponential".into(),
            shift_terminal: None,
            base_shift: None,
            max_shift: None,
            invert_sigmas: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

impl SchedulerConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: SchedulerConfig =
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("bad scheduler config: {e}")))?;
        cfg.validate().map_err(|r| Error::config(path, r))?;
        Ok(cfg)
    }

    /// Settings the sampler supports, with usable values (a NaN or zero shift would give NaN
    /// sigmas and a black image many minutes later).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let unsupported = [
            (self.invert_sigmas, "invert_sigmas"),
            (self.use_karras_sigmas, "use_karras_sigmas"),
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.stochastic_sampling, "stochastic_sampling"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!("`{name}` is not supported by the flux2 sampler"));
        }
        if self.time_shift_type != "exponential" && self.time_shift_type != "linear" {
            return Err(format!("time_shift_type `{}` is unknown", self.time_shift_type));
        }
        positive_finite("num_train_timesteps", self.num_train_timesteps)?;
        positive_finite("shift", self.shift)?;
        for (name, v) in [("base_shift", self.base_shift), ("max_shift", self.max_shift)] {
            if let Some(v) = v {
                positive_finite(name, v)?;
            }
        }
        // diffusers stretches the sigmas so the last is `shift_terminal`: it must lie in [0, 1).
        if let Some(t) = self.shift_terminal {
            if !(0.0..1.0).contains(&t) {
                return Err(format!("shift_terminal must be at least 0 and below 1, not {t}"));
            }
        }
        Ok(())
    }
}

/// diffusers' `compute_empirical_mu` (`image_seq_len` counts the noisy tokens only).
pub fn empirical_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let l = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * l + b2;
    }
    let m_200 = a2 * l + b2;
    let m_10 = a1 * l + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * steps as f64 + b
}

/// How the sampler's time reaches the DiT's sinusoid (spec §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimestepMode {
    /// diffusers: `t = σ·1000` (f32) cast to the model dtype, `/ 1000`, then `· 1000` inside the
    /// model, each step rounded to the compute dtype (bf16 on the GPU, f32 on the CPU reference).
    Diffusers,
    /// diffusers' bf16 values on any backend (to compare the CPU reference with a bf16 run).
    DiffusersBf16,
    /// diffusers' float32 values on any backend (to compare a bf16 run with float32 references,
    /// such as the committed fixtures).
    DiffusersF32,
    /// BFL: `σ` cast to bf16, `· 1000` in bf16.
    Bfl,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub mu: f64,
    /// `steps + 1` values from 1 down to the terminal 0.
    pub sigmas: Vec<f32>,
    /// `σ·1000` for each step (diffusers' `scheduler.timesteps`).
    pub timesteps: Vec<f32>,
}

impl Schedule {
    /// The schedule diffusers' klein pipelines set: `linspace(1, 1/steps, steps)` in f32,
    /// shifted with mu (float32 arithmetic like numpy's), timesteps `σ·1000`, terminal 0.
    pub fn new(cfg: &SchedulerConfig, image_seq_len: usize, steps: usize) -> Result<Schedule> {
        if steps == 0 {
            return Err(Error::InvalidArgument("steps must be at least 1".into()));
        }
        let mu = empirical_mu(image_seq_len, steps);
        // numpy.linspace(1, 1/steps, steps): i·step + start, the last value set to stop exactly.
        let (start, stop) = (1.0f64, 1.0 / steps as f64);
        let step = if steps > 1 { (stop - start) / (steps - 1) as f64 } else { 0.0 };
        let lin: Vec<f32> = (0..steps)
            .map(|i| if i + 1 == steps && steps > 1 { stop } else { i as f64 * step + start } as f32)
            .collect();
        let mut sigmas: Vec<f32> = if cfg.use_dynamic_shifting {
            let (e, linear) = (mu.exp() as f32, cfg.time_shift_type == "linear");
            let m = if linear { mu as f32 } else { e };
            lin.iter().map(|&t| m / (m + (1.0f32 / t - 1.0))).collect()
        } else {
            let s = cfg.shift as f32;
            lin.iter().map(|&t| s * t / (1.0 + (s - 1.0) * t)).collect()
        };
        if let Some(term) = cfg.shift_terminal {
            let last = 1.0 - *sigmas.last().unwrap();
            let scale = last / (1.0 - term as f32);
            sigmas.iter_mut().for_each(|s| *s = 1.0 - (1.0 - *s) / scale);
        }
        let n = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|s| s * n).collect();
        sigmas.push(0.0);
        Ok(Schedule { mu, sigmas, timesteps })
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The value the DiT's sinusoid sees at `step` (what diffusers computes as
    /// `timestep.to(dtype) * 1000` inside the model), for a model computing in `compute`.
    pub fn model_time(&self, step: usize, mode: TimestepMode, compute: DType) -> f32 {
        let round = |x: f32, d: DType| {
            let mut v = [x];
            round_through(&mut v, d);
            v[0]
        };
        match mode {
            TimestepMode::Diffusers | TimestepMode::DiffusersBf16 | TimestepMode::DiffusersF32 => {
                let d = match mode {
                    TimestepMode::DiffusersBf16 => DType::BF16,
                    TimestepMode::DiffusersF32 => DType::F32,
                    _ => compute,
                };
                let t = round(self.timesteps[step], d); // .to(latents.dtype)
                let sigma_in = round(t / 1000.0, d); // timestep / 1000
                round(round(sigma_in, d) * 1000.0, d) // .to(dtype) * 1000
            }
            TimestepMode::Bfl => round(round(self.sigmas[step], DType::BF16) * 1000.0, DType::BF16),
        }
    }

    /// Euler step size `σ_{i+1} - σ_i` (negative).
    pub fn dt(&self, step: usize) -> f32 {
        self.sigmas[step + 1] - self.sigmas[step]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn sigmas_match_the_spec_table() {
        let cfg = SchedulerConfig::default();
        let s = Schedule::new(&cfg, 4096, 4).unwrap();
        assert!((s.mu - 2.291180).abs() < 1e-5);
        assert!(close(&s.sigmas, &[1.0, 0.967384, 0.908144, 0.767200, 0.0], 1e-6), "{:?}", s.sigmas);
        let s = Schedule::new(&cfg, 1024, 4).unwrap();
        assert!(close(&s.sigmas, &[1.0, 0.958085, 0.883982, 0.717497, 0.0], 1e-6));
        let s = Schedule::new(&cfg, 16384, 4).unwrap();
        assert!((s.mu - 3.229986).abs() < 1e-5);
        assert!(close(&s.sigmas, &[1.0, 0.986986, 0.961947, 0.893915, 0.0], 1e-6));
        let s = Schedule::new(&cfg, 4096, 50).unwrap();
        assert!((s.mu - 2.023351).abs() < 1e-5);
        assert!((s.sigmas[1] - 0.997309).abs() < 1e-6 && (s.sigmas[49] - 0.133719).abs() < 1e-6);
    }

    #[test]
    fn model_timesteps_follow_each_reference() {
        let s = Schedule::new(&SchedulerConfig::default(), 4096, 4).unwrap();
        let t = |mode, d| (0..4).map(|i| s.model_time(i, mode, d)).collect::<Vec<_>>();
        assert_eq!(t(TimestepMode::Diffusers, DType::BF16), vec![1000.0, 968.0, 908.0, 768.0]);
        assert_eq!(t(TimestepMode::DiffusersBf16, DType::F32), vec![1000.0, 968.0, 908.0, 768.0]);
        assert_eq!(t(TimestepMode::DiffusersF32, DType::BF16), t(TimestepMode::Diffusers, DType::F32));
        assert_eq!(t(TimestepMode::Bfl, DType::F32), vec![1000.0, 968.0, 908.0, 764.0]);
        let f32_times = t(TimestepMode::Diffusers, DType::F32);
        assert!((f32_times[1] - 967.384).abs() < 1e-2);
        let s512 = Schedule::new(&SchedulerConfig::default(), 1024, 4).unwrap();
        let d: Vec<f32> = (0..4).map(|i| s512.model_time(i, TimestepMode::Diffusers, DType::BF16)).collect();
        let b: Vec<f32> = (0..4).map(|i| s512.model_time(i, TimestepMode::Bfl, DType::BF16)).collect();
        assert_eq!(d, vec![1000.0, 960.0, 884.0, 716.0]);
        assert_eq!(b, vec![1000.0, 956.0, 884.0, 720.0]);
    }

    #[test]
    fn static_shift_and_terminal() {
        let cfg = SchedulerConfig { use_dynamic_shifting: false, shift: 3.0, ..Default::default() };
        let s = Schedule::new(&cfg, 4096, 2).unwrap();
        assert!(close(&s.sigmas, &[1.0, 0.75, 0.0], 1e-6));
        let cfg = SchedulerConfig { shift_terminal: Some(0.1), ..cfg };
        let s = Schedule::new(&cfg, 4096, 2).unwrap();
        assert!((s.sigmas[1] - 0.1).abs() < 1e-6);
        assert!(Schedule::new(&SchedulerConfig::default(), 16, 0).is_err());
    }
}
