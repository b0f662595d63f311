//! Config values are range-checked on load: NaN, infinite, zero or negative settings and
//! inconsistent sizes are clear errors naming the file, and every committed config still loads.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures;
use flux2::model::qwen3::Qwen3Config;
use flux2::model::transformer::config::TransformerConfig;
use flux2::model::vae::VaeConfig;
use flux2::sampler::SchedulerConfig;
use flux2::Error;

/// `base` (a JSON object) with `key` set to `value`, written to a temporary config.json.
fn edited(dir: &Path, base: &Path, edits: &[(&str, serde_json::Value)]) -> PathBuf {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base).unwrap()).unwrap();
    for (k, value) in edits {
        v[*k] = value.clone();
    }
    let p = dir.join("config.json");
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

fn config_error<T: std::fmt::Debug>(r: flux2::Result<T>, want: &str) {
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("config.json") && msg.contains(want), "`{msg}` should mention `{want}`");
}

#[test]
fn committed_configs_load() {
    let f = fixtures();
    for case in
        ["pipeline", "transformer/t2i_nonsquare", "transformer/guidance_outchannels", "transformer/batch2_hd24_ref"]
    {
        TransformerConfig::from_json_file(&f.join(case).join("transformer/config.json")).unwrap();
    }
    Qwen3Config::from_json_file(&f.join("pipeline/text_encoder/config.json")).unwrap();
    VaeConfig::from_json_file(&f.join("pipeline/vae/config.json")).unwrap();
    SchedulerConfig::from_json_file(&f.join("pipeline/scheduler/scheduler_config.json")).unwrap();
    for built_in in [TransformerConfig::klein_4b(), TransformerConfig::klein_9b()] {
        built_in.validate().unwrap();
    }
    Qwen3Config::qwen3_4b().validate().unwrap();
    Qwen3Config::qwen3_8b().validate().unwrap();
    VaeConfig::default().validate().unwrap();
    SchedulerConfig::default().validate().unwrap();
}

#[test]
fn transformer_config_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline/transformer/config.json");
    let load =
        |edits: &[(&str, serde_json::Value)]| TransformerConfig::from_json_file(&edited(dir.path(), &base, edits));
    config_error(load(&[("rope_theta", 0.into())]), "rope_theta");
    config_error(load(&[("eps", (-1e-6).into())]), "eps");
    config_error(load(&[("eps", 0.into())]), "eps");
    config_error(load(&[("mlp_ratio", (-3.0).into())]), "mlp_ratio");
    config_error(load(&[("attention_head_dim", 20.into())]), "axes_dims_rope");
    config_error(load(&[("axes_dims_rope", serde_json::json!([4, 4, 4]))]), "axes_dims_rope");
    config_error(load(&[("num_layers", 0.into()), ("num_single_layers", 0.into())]), "at least one block");
    config_error(load(&[("out_channels", 0.into())]), "out_channels");
    config_error(load(&[("num_attention_heads", serde_json::json!(1u64 << 62))]), "overflow");
    // Every size the planner multiplies stays within 64 bits.
    config_error(load(&[("joint_attention_dim", serde_json::json!(1u64 << 40))]), "joint_attention_dim");
    config_error(load(&[("num_attention_heads", serde_json::json!(1u64 << 30))]), "hidden size");
    // JSON cannot spell NaN or infinity, but a config built in code can.
    let cfg = TransformerConfig { eps: f64::NAN, ..TransformerConfig::klein_4b() };
    assert!(cfg.validate().unwrap_err().contains("eps"));
    let cfg = TransformerConfig { rope_theta: f64::INFINITY, ..TransformerConfig::klein_4b() };
    assert!(cfg.validate().unwrap_err().contains("rope_theta"));
}

#[test]
fn qwen3_config_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline/text_encoder/config.json");
    let load = |edits: &[(&str, serde_json::Value)]| Qwen3Config::from_json_file(&edited(dir.path(), &base, edits));
    config_error(load(&[("rms_norm_eps", 0.into())]), "rms_norm_eps");
    config_error(load(&[("rope_theta", (-10000.0).into())]), "rope_theta");
    config_error(load(&[("rope_theta", 0.into())]), "rope_theta");
    config_error(load(&[("num_attention_heads", 3.into()), ("num_key_value_heads", 2.into())]), "num_key_value_heads");
    config_error(load(&[("num_key_value_heads", 0.into())]), "num_key_value_heads");
    config_error(load(&[("head_dim", 0.into())]), "head_dim");
    config_error(load(&[("head_dim", 7.into())]), "head_dim");
    config_error(load(&[("vocab_size", 0.into())]), "vocab_size");
    config_error(load(&[("intermediate_size", serde_json::json!(1u64 << 40))]), "intermediate_size");
    config_error(load(&[("num_hidden_layers", 0.into())]), "num_hidden_layers");
    let cfg = Qwen3Config { rms_norm_eps: f64::NAN, ..Qwen3Config::qwen3_4b() };
    assert!(cfg.validate().unwrap_err().contains("rms_norm_eps"));
    let cfg = Qwen3Config { rope_theta: Some(f64::NAN), ..Qwen3Config::qwen3_4b() };
    assert!(cfg.validate().unwrap_err().contains("rope_theta"));
    let cfg = Qwen3Config { head_dim: None, hidden_size: 100, num_attention_heads: 32, ..Qwen3Config::qwen3_4b() };
    assert!(cfg.validate().unwrap_err().contains("multiple"));
}

#[test]
fn vae_config_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline/vae/config.json");
    let load = |edits: &[(&str, serde_json::Value)]| VaeConfig::from_json_file(&edited(dir.path(), &base, edits));
    config_error(load(&[("batch_norm_eps", 0.into())]), "batch_norm_eps");
    config_error(load(&[("batch_norm_eps", (-1.0).into())]), "batch_norm_eps");
    config_error(load(&[("norm_num_groups", 3.into())]), "norm_num_groups");
    config_error(load(&[("norm_num_groups", 0.into())]), "norm_num_groups");
    config_error(load(&[("latent_channels", 0.into())]), "latent_channels");
    config_error(load(&[("block_out_channels", serde_json::json!([0, 16, 16, 16]))]), "positive");
    config_error(load(&[("block_out_channels", serde_json::json!([16, 16, 16, 1u64 << 40]))]), "block_out_channels");
    let cfg = VaeConfig { batch_norm_eps: f64::NAN, ..VaeConfig::default() };
    assert!(cfg.validate().unwrap_err().contains("batch_norm_eps"));
}

#[test]
fn scheduler_config_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("pipeline/scheduler/scheduler_config.json");
    let load = |edits: &[(&str, serde_json::Value)]| SchedulerConfig::from_json_file(&edited(dir.path(), &base, edits));
    config_error(load(&[("shift", 0.into())]), "shift");
    config_error(load(&[("shift", (-3.0).into())]), "shift");
    config_error(load(&[("max_shift", (-1.0).into())]), "max_shift");
    config_error(load(&[("num_train_timesteps", 0.into())]), "num_train_timesteps");
    config_error(load(&[("shift_terminal", 1.0.into())]), "shift_terminal");
    let cfg = SchedulerConfig { shift: f64::NAN, ..SchedulerConfig::default() };
    assert!(cfg.validate().unwrap_err().contains("shift"));
    let cfg = SchedulerConfig { shift_terminal: Some(f64::NAN), ..SchedulerConfig::default() };
    assert!(cfg.validate().unwrap_err().contains("shift_terminal"));
}
