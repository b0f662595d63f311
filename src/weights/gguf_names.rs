//! llama.cpp's tensor names for Qwen3 GGUF files (`blk.N.attn_q.weight`, ...) and the Hugging Face
//! names our text encoder loads (`model.layers.N.self_attn.q_proj.weight`, ...). llama.cpp's
//! converter does not permute Qwen3's q/k rows (only LLaMA's), so the tensors map one to one.

/// The Hugging Face name of a llama.cpp tensor name, or None if it is not a Qwen3 tensor.
pub fn qwen3_hf_name(gguf: &str) -> Option<String> {
    let whole = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = whole {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, field) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, suffix) = field.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::qwen3_hf_name;

    #[test]
    fn llama_cpp_names_map_to_hugging_face_names() {
        assert_eq!(qwen3_hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(qwen3_hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(qwen3_hf_name("blk.3.attn_q.bias").unwrap(), "model.layers.3.self_attn.q_proj.bias");
        assert_eq!(qwen3_hf_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(qwen3_hf_name("blk.35.attn_k_norm.weight").unwrap(), "model.layers.35.self_attn.k_norm.weight");
        assert_eq!(qwen3_hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(qwen3_hf_name("rope_freqs.weight"), None);
    }
}
