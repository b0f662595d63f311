//! `flux2 selftest`: every op on random inputs against the CPU reference, as a table.

use std::path::PathBuf;

use crate::device::{self, DeviceChoice};
use crate::error::{Error, Result};
use crate::selftest::Suite;

#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Only ops whose name contains this.
    #[arg(long, default_value = "")]
    pub op: String,
    /// The small suite: every op, kernel and launch path at small sizes (chosen by itself under
    /// the CUDA emulator).
    #[arg(long)]
    pub small: bool,
    /// Timed repetitions per case (after one checked run); default 3, 0 under the CUDA emulator.
    #[arg(long)]
    pub reps: Option<usize>,
    /// Also write the outcomes as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write every case's output (f32 safetensors, one tensor per case, untimed) to compare two
    /// backends case by case, e.g. a GPU with the emulator: `flux2 compare A B --ulps`.
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

pub fn run(args: &SelftestArgs) -> Result<()> {
    let be = device::select(args.device)?;
    let emulated = crate::selftest::is_emulated(&*be);
    let suite = if args.small { Suite::Small } else { Suite::for_backend(&*be) };
    let reps = args.reps.unwrap_or(if emulated { 0 } else { 3 });
    println!("device: {}", be.name());
    println!("suite: {}{}", suite.name(), if emulated { " (emulated device)" } else { "" });
    if be.kind() == crate::tensor::DeviceKind::Cpu {
        // The reference compared with itself: only the harness is exercised.
        println!(
            "note: the device under test is the CPU reference itself, so this run checks the harness \
             (inputs, ops run, tolerances), not a backend; the CPU ops are checked against hand-computed \
             values and diffusers fixtures by the test suite. Use --device cuda to check the GPU kernels."
        );
    }
    #[cfg(feature = "cuda")]
    if let Some(cuda) = device::as_cuda(&be) {
        cuda.set_poison(true);
    }
    let outcomes = match &args.dump {
        Some(_) => crate::selftest::run_suite_keeping_outputs(&*be, suite, &args.op),
        None => crate::selftest::run_suite(&*be, suite, &args.op, reps),
    };
    if outcomes.is_empty() {
        return Err(Error::InvalidArgument(format!("no op matches `{}`", args.op)));
    }
    print!("{}", crate::selftest::table(&outcomes));
    if let Some(path) = &args.json {
        let json = serde_json::json!({"device": be.name(), "suite": suite, "outcomes": outcomes});
        crate::output_file::write_bytes(path, serde_json::to_string_pretty(&json).unwrap().as_bytes())?;
    }
    if let Some(path) = &args.dump {
        write_dump(path, &outcomes)?;
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    if failed > 0 {
        return Err(Error::Other(format!("{failed} of {} op checks failed", outcomes.len())));
    }
    Ok(())
}

fn write_dump(path: &std::path::Path, outcomes: &[crate::selftest::Outcome]) -> Result<()> {
    use crate::weights::safetensors::{write_safetensors, TensorEntry};
    let named: Vec<(String, &(Vec<f32>, Vec<usize>))> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.output.as_ref().map(|out| (crate::selftest::dump_name(i, o), out)))
        .collect();
    let entries = named.iter().map(|(n, (v, shape))| TensorEntry::from_f32(n, v, shape, crate::DType::F32)).collect();
    write_safetensors(path, entries, &Default::default())
}
