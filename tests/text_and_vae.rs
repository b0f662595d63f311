//! Tokenizer ids, the Qwen3 text encoder and the VAE against the Python reference.

mod common;

use std::sync::Arc;

use common::{fixtures, load, rel_err, run_cli};
use flux2::backend::cpu::CpuBackend;
use flux2::model::tokenizer::{PromptTokenizer, MAX_TOKENS};
use flux2::Backend;

fn tokenizer_cases() -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_ids.json")).unwrap()).unwrap()
}

fn check_ids(tok: &PromptTokenizer) {
    for case in tokenizer_cases() {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode_prompt(prompt, MAX_TOKENS).unwrap();
        assert_eq!(got.length, want.len(), "{prompt:?}");
        assert_eq!(&got.ids[..got.length], &want[..], "{prompt:?}");
        assert_eq!(got.ids.len(), MAX_TOKENS);
        assert!(got.ids[got.length..].iter().all(|&i| i == 151643), "padded with <|endoftext|>");
        assert_eq!(got.mask.iter().filter(|&&m| m == 1).count(), got.length);
        assert_eq!(got.untruncated_length, case["untruncated_length"].as_u64().unwrap() as usize);
    }
}

#[test]
fn token_ids_match_transformers() {
    let tok = PromptTokenizer::load(&fixtures().join("pipeline/tokenizer")).unwrap();
    check_ids(&tok);
    // The template around "a photo of a cat": [151644, 872, 198] ... [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    let t = tok.encode_prompt("a photo of a cat", MAX_TOKENS).unwrap();
    assert_eq!(&t.ids[..3], &[151644, 872, 198]);
    assert_eq!(&t.ids[t.length - 9..t.length], &[151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]);
}

#[test]
fn vocab_and_merges_folder_gives_the_same_ids() {
    // Rebuild the slow-tokenizer files from tokenizer.json and load them without it.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("pipeline/tokenizer/tokenizer.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vocab.json"), json["model"]["vocab"].to_string()).unwrap();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(pair) => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            _ => panic!("unexpected merge entry"),
        })
        .collect();
    std::fs::write(dir.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
    let tok = PromptTokenizer::load(dir.path()).unwrap();
    check_ids(&tok);
}

#[test]
fn missing_tokenizer_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = PromptTokenizer::load(dir.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    assert!(PromptTokenizer::load(&dir.path().join("nope")).is_err());
}

#[test]
fn components_match_the_reference_through_the_cli() {
    let c = fixtures().join("components");
    let p = fixtures().join("pipeline");
    let tmp = tempfile::tempdir().unwrap();
    for (component, inputs, expected, keys) in [
        ("text-encoder", "text_encoder_inputs", "text_encoder_expected", vec!["prompt_embeds"]),
        ("vae-encode", "vae_encode_inputs", "vae_encode_expected", vec!["latent", "image_latents"]),
        ("vae-decode", "vae_decode_inputs", "vae_decode_expected", vec!["sample"]),
    ] {
        let out = tmp.path().join(format!("{component}.safetensors"));
        let (ok, _, err) = run_cli(&[
            "forward",
            component,
            "--model",
            p.to_str().unwrap(),
            "--inputs",
            c.join(format!("{inputs}.safetensors")).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert!(ok, "{component}: {err}");
        for key in keys {
            let got = load(&out, key);
            let want = load(&c.join(format!("{expected}.safetensors")), key);
            assert_eq!(got.shape(), want.shape(), "{component}/{key}");
            let e = rel_err(&got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap());
            assert!(e <= 1e-4, "{component}/{key}: relative error {e}");
        }
    }
}

#[test]
fn vae_decode_accepts_pipeline_latents() {
    // 4·z channels: normalised and patchified, as the transformer produces them.
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let vae = flux2::model::vae::Vae::load(
        be.clone(),
        &fixtures().join("pipeline/vae"),
        flux2::model::vae::VaeParts { encoder: true, decoder: true },
    )
    .unwrap();
    let img = load(&fixtures().join("components/vae_encode_inputs.safetensors"), "image");
    let packed = vae.encode_normalized(&img).unwrap();
    let direct = vae.decode(&vae.encode(&img).unwrap()).unwrap();
    let via_normalized = vae.decode_normalized(&packed).unwrap();
    assert!(rel_err(&via_normalized.to_vec_f32().unwrap(), &direct.to_vec_f32().unwrap()) < 1e-5);
}

#[test]
fn bfl_vae_keys() {
    use flux2::model::vae::bfl_key;
    assert_eq!(
        bfl_key("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", 4),
        "encoder.down.1.block.0.nin_shortcut.weight"
    );
    assert_eq!(bfl_key("encoder.down_blocks.2.downsamplers.0.conv.bias", 4), "encoder.down.2.downsample.conv.bias");
    assert_eq!(bfl_key("decoder.up_blocks.0.resnets.2.norm1.weight", 4), "decoder.up.3.block.2.norm1.weight");
    assert_eq!(bfl_key("decoder.up_blocks.2.upsamplers.0.conv.weight", 4), "decoder.up.1.upsample.conv.weight");
    assert_eq!(bfl_key("encoder.mid_block.resnets.1.conv2.weight", 4), "encoder.mid.block_2.conv2.weight");
    assert_eq!(bfl_key("decoder.mid_block.attentions.0.to_out.0.weight", 4), "decoder.mid.attn_1.proj_out.weight");
    assert_eq!(bfl_key("decoder.mid_block.attentions.0.group_norm.bias", 4), "decoder.mid.attn_1.norm.bias");
    assert_eq!(bfl_key("encoder.conv_norm_out.weight", 4), "encoder.norm_out.weight");
    assert_eq!(bfl_key("quant_conv.weight", 4), "encoder.quant_conv.weight");
    assert_eq!(bfl_key("post_quant_conv.bias", 4), "decoder.post_quant_conv.bias");
    assert_eq!(bfl_key("bn.running_mean", 4), "bn.running_mean");
}

#[test]
fn bfl_ae_file_loads_as_the_same_vae() {
    use flux2::model::vae::{bfl_key, Vae, VaeParts};
    use flux2::weights::safetensors::{write_safetensors, TensorEntry};
    use flux2::weights::WeightStore;
    let src = WeightStore::open(&fixtures().join("pipeline/vae")).unwrap();
    let tensors: Vec<(String, Vec<f32>, Vec<usize>)> = src
        .keys()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .map(|k| {
            let mut shape = src.shape(k).unwrap();
            if k.contains("attentions") && shape.len() == 2 {
                shape.extend([1, 1]); // BFL stores 1x1 convs
            }
            (bfl_key(k, 4), src.get(k).unwrap().to_f32().unwrap(), shape)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let ae = dir.path().join("ae.safetensors");
    let entries = tensors.iter().map(|(n, v, s)| TensorEntry::from_f32(n, v, s, flux2::DType::F32)).collect();
    write_safetensors(&ae, entries, &Default::default()).unwrap();

    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let parts = VaeParts { encoder: true, decoder: true };
    // BFL's GroupNorm is fixed at 32 groups, which this tiny VAE (8 channels) cannot have, so
    // inferring its config from shapes must refuse it...
    let e = Vae::load(be.clone(), &ae, parts).err().unwrap().to_string();
    assert!(e.contains("norm_num_groups"), "{e}");
    // ...and with the tiny model's config given, the BFL keys load exactly the same weights.
    let cfg = flux2::model::vae::VaeConfig::from_json_file(&fixtures().join("pipeline/vae/config.json")).unwrap();
    let store = WeightStore::open(&ae).unwrap();
    let bfl = Vae::from_store(be.clone(), &store, flux2::model::vae::VaeLayout::Bfl, cfg, parts).unwrap();
    let diffusers = Vae::load(be, &fixtures().join("pipeline/vae"), parts).unwrap();
    let img = load(&fixtures().join("components/vae_encode_inputs.safetensors"), "image");
    let (a, b) = (bfl.encode(&img).unwrap(), diffusers.encode(&img).unwrap());
    assert_eq!(a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    assert_eq!(bfl.decode(&a).unwrap().to_vec_f32().unwrap(), diffusers.decode(&b).unwrap().to_vec_f32().unwrap());
}
