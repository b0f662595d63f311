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
    /// Serve the OpenAI Images API with the models resident (one worker per device).
    Serve(cli::serve::ServeArgs),
}

/// Standard output closed or full (`flux2 inspect X --json | head -1`, `> /dev/full`): end as a
/// command-line tool should, never with a panic. A closed pipe ends the program silently, through
/// SIGPIPE where there is one (exit status 141 in a shell, as `cat` does); a failed write is an
/// error line and exit status 1.
fn quiet_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: resetting a signal's disposition to the default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if let Some(reason) = msg.and_then(|m| m.strip_prefix("failed printing to stdout: ")) {
            if reason.contains("Broken pipe") || reason.contains("os error 32") || reason.contains("os error 232") {
                std::process::exit(141);
            }
            eprintln!("error: cannot write to standard output: {reason}");
            std::process::exit(1);
        }
        default_hook(info)
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
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
        Command::Serve(a) => cli::serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
