//! The transformer from both checkpoint layouts against diffusers' float32 outputs.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{fixtures, load, rel_err};
use flux2::backend::cpu::CpuBackend;
use flux2::model::transformer::layout::Layout;
use flux2::model::transformer::Flux2Transformer;
use flux2::Backend;

const CASES: [&str; 3] = ["t2i_nonsquare", "batch2_hd24_ref", "guidance_outchannels"];

fn run_case(model_path: &Path, case_dir: &Path, ids_file: &str) -> Vec<f32> {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    common::forward_case(&Flux2Transformer::load(be, model_path).unwrap(), case_dir, ids_file)
}

#[test]
fn diffusers_layout_matches_diffusers() {
    for case in CASES {
        let dir = fixtures().join("transformer").join(case);
        let want = load(&dir.join("expected.safetensors"), "sample").to_vec_f32().unwrap();
        // Pipeline-style folder (with transformer/) and the transformer folder itself.
        for model in [dir.clone(), dir.join("transformer")] {
            let got = run_case(&model, &dir, "inputs.safetensors");
            let err = rel_err(&got, &want);
            assert!(err <= 1e-4, "{case}: max relative error {err}");
        }
    }
}

#[test]
fn bfl_layout_matches_diffusers() {
    for case in CASES {
        let dir = fixtures().join("transformer").join(case);
        let want = load(&dir.join("expected.safetensors"), "sample").to_vec_f32().unwrap();
        // int64 ids, as PyTorch produces them, read through the same path.
        let got = run_case(&dir.join("bfl.safetensors"), &dir, "ids_int64.safetensors");
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "{case}: max relative error {err}");
    }
}

#[test]
fn bfl_config_is_inferred_from_shapes() {
    let dir = fixtures().join("transformer/batch2_hd24_ref");
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let bfl = Flux2Transformer::load(be.clone(), &dir.join("bfl.safetensors")).unwrap();
    let diffusers = Flux2Transformer::load(be, &dir).unwrap();
    assert_eq!(bfl.layout(), Layout::Bfl);
    assert_eq!(diffusers.layout(), Layout::Diffusers);
    let (a, b) = (bfl.config(), diffusers.config());
    assert_eq!(a.attention_head_dim, 24);
    assert_eq!(
        (a.num_attention_heads, a.num_layers, a.num_single_layers),
        (b.num_attention_heads, b.num_layers, b.num_single_layers)
    );
    assert_eq!(
        (a.mlp_hidden(), a.joint_attention_dim, a.in_channels),
        (b.mlp_hidden(), b.joint_attention_dim, b.in_channels)
    );
    assert_eq!(a.axes_dims_rope, vec![6, 6, 6, 6]);
}

#[test]
fn wrong_input_shapes_are_errors() {
    let dir = fixtures().join("transformer/t2i_nonsquare");
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let model = Flux2Transformer::load(be, &dir).unwrap();
    let inputs = dir.join("inputs.safetensors");
    let x = load(&inputs, "hidden_states");
    let ctx = load(&inputs, "encoder_hidden_states");
    let img = common::position_ids(&inputs, "img_ids");
    let txt = common::position_ids(&inputs, "txt_ids");
    // Wrong channel count, wrong batch of timesteps, ids that do not match the token count.
    let bad_x = flux2::Tensor::from_f32(vec![0.0; 15 * 8], &[1, 15, 8]).unwrap();
    assert!(model.forward(&bad_x, &ctx, &[500.0], &img, &txt, None).is_err());
    assert!(model.forward(&x, &ctx, &[500.0, 500.0], &img, &txt, None).is_err());
    assert!(model.forward(&x, &ctx, &[500.0], &txt, &txt, None).is_err());
}
