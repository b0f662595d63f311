//! What the CPU backend computes in: `f32` (every weight widened at load; the exact reference the
//! fixture tests use) or `bf16` (weights stay in their stored dtype, in the memory map, and the
//! GEMMs convert them while packing), and which instruction set the mixed GEMMs use.

use crate::error::{Error, Result};

/// `--cpu-precision` (the flag's values are a contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuPrecision {
    /// Exact reference: f32 weights and activations.
    #[default]
    F32,
    /// Weights as stored (bf16, f16, fp8), f32 activations, bf16 dot products where the CPU has them.
    Bf16,
}

impl CpuPrecision {
    pub fn name(self) -> &'static str {
        match self {
            CpuPrecision::F32 => "f32",
            CpuPrecision::Bf16 => "bf16",
        }
    }
}

/// The code path of the mixed-precision GEMM. `FLUX2_CPU_ISA` forces one (for tests and
/// benchmarks); otherwise the best the CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// v1: weights widened to f32 panel by panel, products by the `gemm` crate (any CPU).
    Portable,
    /// v2: AVX2 + FMA micro-kernel, weights widened to f32 in the packing.
    Avx2Fma,
    /// v3: AVX-512 BF16 micro-kernel (`vdpbf16ps`), activations rounded to bf16 in the packing.
    Avx512Bf16,
    /// v4: AMX tiles (`tdpbf16ps`), activations rounded to bf16 in the packing.
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2Fma, Isa::Avx512Bf16, Isa::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512bf16")
            }
            // v4 packs its activations with the v3 code.
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Isa::Avx512Bf16.available() && super::mixed_gemm::amx_available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available path.
    pub fn best() -> Isa {
        [Isa::Amx, Isa::Avx512Bf16, Isa::Avx2Fma].into_iter().find(|i| i.available()).unwrap_or(Isa::Portable)
    }

    pub fn parse(s: &str) -> Result<Isa> {
        let isa = Isa::ALL.into_iter().find(|i| i.name() == s.to_ascii_lowercase()).ok_or_else(|| {
            Error::InvalidArgument(format!("FLUX2_CPU_ISA={s:?}: expected one of portable, avx2, avx512bf16, amx"))
        })?;
        if !isa.available() {
            return Err(Error::InvalidArgument(format!("FLUX2_CPU_ISA={s}: this CPU does not have {s}")));
        }
        Ok(isa)
    }

    /// `FLUX2_CPU_ISA` if set (checked), else the best available.
    pub fn from_env() -> Result<Isa> {
        match std::env::var("FLUX2_CPU_ISA") {
            Ok(s) if !s.is_empty() => Isa::parse(&s),
            _ => Ok(Isa::best()),
        }
    }
}
