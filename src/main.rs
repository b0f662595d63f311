use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flux2::cli;

#[derive(Parser)]
#[command(name = "flux2", version, about = "FLUX.2 [klein] inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (text-to-image, or editing with --ref).
    Generate(cli::generate::GenerateArgs),
    /// Run one model component on tensors from a safetensors file.
    Forward(cli::forward::ForwardArgs),
    /// Describe a checkpoint: layout, config, parameters, bytes per dtype.
    Inspect(cli::inspect::InspectArgs),
    /// Write a random-weight checkpoint with the real tensor names and shapes.
    Synth(cli::synth::SynthArgs),
    /// Check every op of a backend against the CPU reference on random inputs.
    Selftest(cli::selftest::SelftestArgs),
    /// Time kernels and models at the klein shapes (gemm, attention, dit, pipeline).
    Bench(cli::bench::BenchArgs),
    /// Compare every attention path's speed and error against f32.
    Profile(cli::bench::ProfileArgs),
    /// Print the GPU memory plan for a model, image size and VRAM budget (no GPU needed).
    Plan(cli::plan::PlanArgs),
    /// Compare two outputs (safetensors tensors or PNG images), optionally as a pass/fail gate.
    Compare(cli::compare::CompareArgs),
    /// Report the driver, GPU, VRAM, compute capability, embedded kernels and NVML.
    Doctor(cli::doctor::DoctorArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FLUX2_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => cli::generate::run(a),
        Command::Forward(a) => cli::forward::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Synth(a) => cli::synth::run(a),
        Command::Selftest(a) => cli::selftest::run(a),
        Command::Doctor(a) => cli::doctor::run(a),
        Command::Compare(a) => cli::compare::run(a),
        Command::Plan(a) => cli::plan::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Profile(a) => cli::bench::run_profile(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
