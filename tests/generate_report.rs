//! `generate --json`: each component's load time, each stage's time, the host's memory readings,
//! and with `--noise` the noise file instead of an unused seed.

mod common;

use common::{fixtures, generate_args, run_cli};

#[test]
fn the_report_has_load_times_stage_times_and_host_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, report) = (tmp.path().join("o.png"), tmp.path().join("report.json"));
    let pipeline = fixtures().join("pipeline");
    let noise = fixtures().join("cases/t2i_nonsquare/noise.safetensors");
    let flags = ["--prompt", "x", "--noise", noise.to_str().unwrap(), "--seed", "3", "--no-prompt-cache"];
    let args = [generate_args(pipeline.to_str().unwrap(), &out, &flags), vec!["--json", report.to_str().unwrap()]];
    let (ok, _, err) = run_cli(&args.concat());
    assert!(ok, "{err}");
    assert!(err.contains("transformer loaded in") && err.contains("prompt encoded in"), "{err}");
    assert!(!err.contains("seed 3"), "{err}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let loads: Vec<&str> =
        r["component_loads"].as_array().unwrap().iter().map(|l| l["component"].as_str().unwrap()).collect();
    for component in ["vae decoder", "text encoder", "transformer"] {
        assert!(loads.contains(&component), "{loads:?}");
    }
    assert!(r["component_loads"].as_array().unwrap().iter().all(|l| l["seconds"].as_f64().unwrap() >= 0.0));
    let run = &r["runs"][0];
    for stage in ["encode", "denoise", "decode"] {
        assert!(run["seconds"][stage].as_f64().unwrap() >= 0.0, "{stage}: {run}");
    }
    assert!(run["seed"].is_null(), "{run}");
    assert_eq!(run["noise"], noise.display().to_string());
    if cfg!(target_os = "linux") {
        let m = &r["host_memory"];
        let peak = m["peak_resident_bytes"].as_u64().unwrap();
        let anon = m["peak_anonymous_bytes"].as_u64().unwrap();
        assert!(peak > 0 && anon > 0 && anon <= peak + (64 << 20), "{m}");
    }
}
