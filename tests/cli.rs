//! The `flux2` binary end to end: forward, inspect, synth, and clean failures on bad input.

mod common;

use common::{fails_cleanly, fixtures, load, rel_err, run_cli};

#[test]
fn forward_transformer_matches_diffusers() {
    let dir = fixtures().join("transformer/batch2_hd24_ref");
    let tmp = tempfile::tempdir().unwrap();
    let want = load(&dir.join("expected.safetensors"), "sample").to_vec_f32().unwrap();
    for model in [dir.clone(), dir.join("bfl.safetensors")] {
        let out = tmp.path().join("out.safetensors");
        let (ok, _, err) = run_cli(&[
            "forward",
            "transformer",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            dir.join("inputs.safetensors").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert!(ok, "{err}");
        let got = load(&out, "sample");
        assert_eq!(got.shape(), &[2, 14, 12]);
        assert!(rel_err(&got.to_vec_f32().unwrap(), &want) <= 1e-4);
    }
}

#[test]
fn inspect_reports_layout_config_and_sizes() {
    let dir = fixtures().join("transformer/batch2_hd24_ref");
    let (ok, out, err) = run_cli(&["inspect", "--json", dir.join("bfl.safetensors").to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "transformer");
    assert_eq!(v["layout"], "bfl");
    assert_eq!(v["config"]["attention_head_dim"], 24);
    assert_eq!(v["dtypes"][0]["dtype"], "BF16");
    let params = v["parameters"].as_u64().unwrap();
    assert_eq!(v["bytes"].as_u64().unwrap(), 2 * params);

    let (ok, out, _) = run_cli(&["inspect", "--json", dir.join("transformer").to_str().unwrap()]);
    assert!(ok);
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["layout"], "diffusers");
    assert_eq!(d["parameters"].as_u64().unwrap(), params);
    assert_eq!(d["files"], 4);

    let (ok, text, _) = run_cli(&["inspect", dir.join("transformer").to_str().unwrap()]);
    assert!(ok && text.contains("layout: diffusers") && text.contains("parameters:"));
}

#[test]
fn synth_writes_loadable_checkpoints() {
    let cfg = fixtures().join("transformer/t2i_nonsquare/transformer/config.json");
    let tmp = tempfile::tempdir().unwrap();
    for layout in ["diffusers", "bfl"] {
        let out = tmp.path().join(layout);
        let (ok, stdout, err) = run_cli(&[
            "synth",
            "--config",
            cfg.to_str().unwrap(),
            "--layout",
            layout,
            "--dtype",
            "bf16",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let written = stdout.lines().last().unwrap();
        let (ok, json, err) =
            run_cli(&["inspect", "--json", if layout == "bfl" { written } else { out.to_str().unwrap() }]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["layout"], layout);
        assert_eq!(v["config"]["num_attention_heads"], 2);
    }
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = fixtures().join("transformer/t2i_nonsquare");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let (model, inputs, out) = (dir.to_str().unwrap(), dir.join("inputs.safetensors"), out.to_str().unwrap());
    let inputs = inputs.to_str().unwrap();
    let forward = |model, inputs| {
        ["forward", "transformer", "--model", model, "--inputs", inputs, "--out", out, "--device", "cpu"]
    };
    fails_cleanly(&forward("/no/such/model", inputs), &["/no/such/model"]);
    fails_cleanly(&forward(model, "/no/inputs.safetensors"), &["inputs.safetensors"]);
    // Inputs of another case: wrong channel count.
    let other = fixtures().join("transformer/guidance_outchannels/inputs.safetensors");
    fails_cleanly(&forward(model, other.to_str().unwrap()), &["hidden_states"]);
    // An inputs file without `timestep`.
    let partial = tmp.path().join("partial.safetensors");
    let x = load(std::path::Path::new(inputs), "hidden_states");
    flux2::cli::write_f32(&partial, &[("hidden_states", &x)]).unwrap();
    fails_cleanly(&forward(model, partial.to_str().unwrap()), &["encoder_hidden_states"]);
    // A text-encoder attention mask that does not match its input ids.
    let te_inputs = fixtures().join("components/text_encoder_inputs.safetensors");
    let ids = load(&te_inputs, "input_ids");
    let short = flux2::Tensor::from_f32(vec![1.0; ids.dim(1) - 1], &[1, ids.dim(1) - 1]).unwrap();
    let bad_mask = tmp.path().join("bad_mask.safetensors");
    flux2::cli::write_f32(&bad_mask, &[("input_ids", &ids), ("attention_mask", &short)]).unwrap();
    let pipeline = fixtures().join("pipeline");
    fails_cleanly(
        &[
            "forward",
            "text-encoder",
            "--model",
            pipeline.to_str().unwrap(),
            "--inputs",
            bad_mask.to_str().unwrap(),
            "--out",
            out,
            "--device",
            "cpu",
        ],
        &["attention_mask"],
    );
    fails_cleanly(&["synth", "--config", "klein-77b", "--out", out], &["klein-77b"]);
    fails_cleanly(&["synth", "--config", "klein-4b", "--dtype", "int3", "--out", out], &["int3"]);
    fails_cleanly(&["inspect", "/no/such/file.safetensors"], &["file.safetensors"]);
}

/// A closed standard output (`flux2 plan ... --json | head -1` after head has exited) ends the
/// program as a pipe's writer should: silently, by SIGPIPE on Unix, never with a panic.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader); // the reader is gone before anything is written
    let out = std::process::Command::new(common::bin())
        .args(["plan", "--config", "klein-4b", "--vram-budget", "16GiB", "--json"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc_sigpipe()), "{:?} {err}", out.status);
    }
    #[cfg(not(unix))]
    assert_eq!(out.status.code(), Some(141), "{err}");
}

#[cfg(unix)]
fn libc_sigpipe() -> i32 {
    13 // SIGPIPE on every Unix flux2 builds for
}

/// A full standard output (`> /dev/full`) is an error line and exit status 1, not a panic.
#[cfg(target_os = "linux")]
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let out = std::process::Command::new(common::bin())
        .arg("doctor")
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write to standard output") && !err.contains("panicked"), "{err}");
}

/// `plan` applies generate's size rule (it planned 0, 17 and 4 Gpx images).
#[test]
fn plan_refuses_the_sizes_generate_refuses() {
    let plan =
        |w: &'static str| ["plan", "--config", "klein-4b", "--vram-budget", "8GiB", "--width", w, "--height", "1024"];
    fails_cleanly(&plan("0"), &["multiples of 16"]);
    fails_cleanly(&plan("17"), &["multiples of 16"]);
    fails_cleanly(&plan("4294967296"), &["larger than flux2 generates"]);
    let (ok, _, err) = run_cli(&plan("1024"));
    assert!(ok, "{err}");
}

#[test]
fn profile_attention_reports_accuracy_on_dit_like_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("attention.json");
    let args = ["profile", "attention", "--device", "cpu", "--seq", "96", "--heads", "2", "--dim", "64", "--reps", "1"];
    let mut with_json = args.to_vec();
    with_json.extend(["--json", json.to_str().unwrap()]);
    let (ok, out, err) = run_cli(&with_json);
    assert!(ok, "{err}");
    assert!(out.contains("Dit inputs"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["inputs"], "dit");
    let rows = v["results"].as_array().unwrap();
    let path = |name: &str| rows.iter().find(|r| r["path"] == name).unwrap_or_else(|| panic!("no {name} row: {v}"));
    // The CPU's exact path is the f32 reference itself; Sage's 8-bit error stays within its gate.
    assert!(path("exact")["cosine"].as_f64().unwrap() > 0.999_999);
    let sage = path("sage")["cosine"].as_f64().unwrap();
    assert!(sage > 0.99 && sage < 1.0, "sage cosine {sage}");
    let (ok, out, err) = run_cli(&[&args[..], &["--inputs", "gaussian"]].concat());
    assert!(ok && out.contains("Gaussian inputs"), "{out}{err}");
    let (ok, _, err) = run_cli(&[&args[..], &["--inputs", "uniform"]].concat());
    assert!(!ok && err.contains("uniform"), "{err}");
}
