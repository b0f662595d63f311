#!/usr/bin/env python3
"""Fixtures for the checkpoint formats users run (tests/formats.rs): one tiny random FLUX.2
transformer of the real architecture, written the ways files come in the wild, each with the
reference's output on the same inputs.

  gguf_q8_0/   BFL names, 2-D weights Q8_0 (F32 where a row is not whole blocks), via the `gguf`
               package; expected = diffusers' own GGUF loading (from_single_file +
               GGUFQuantizationConfig, compute dtype float32).
  gguf_q4_k/   a hidden-256 model (K-quants need rows of 256) in Q4_K, quantized by the small
               Q4_K writer below (checked against gguf's numpy dequantiser); expected as above.
  fp8/         diffusers names as the official -fp8 releases: e4m3 weights with a scalar
               `weight_scale` (and an unused `input_scale`), no markers.
  nvfp4/       BFL names under ComfyUI's `model.diffusion_model.` prefix, per-layer `.comfy_quant`
               markers; weights quantized by comfy-kitchen (packed e2m1, e4m3 block scales in
               cuBLAS's tiled layout, f32 `weight_scale_2`).
  int8/        BFL names, markers in the `_quantization_metadata` header; int8 with ConvRot
               (group 64) where the input width allows, plain rowwise int8 elsewhere.
For the ComfyUI files the expected output is diffusers' forward on comfy-kitchen's own
dequantisation of the file's weights (`dequantized.safetensors` holds a few of them, so the test
also checks the decoding itself). Deterministic.

    python3 -m venv .venv-ref && .venv-ref/bin/pip install -r scripts/reference/requirements.txt \
        gguf==0.19.0 comfy-kitchen==0.2.40
    .venv-ref/bin/python scripts/reference/make_format_fixtures.py
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "formats"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bfl_layout  # noqa: E402
from make_fixtures import randomize_  # noqa: E402


def tiny_model(hidden, seed):
    from diffusers import Flux2Transformer2DModel

    heads = 4
    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=hidden // heads,
               num_attention_heads=heads, joint_attention_dim=hidden, timestep_guidance_channels=64, mlp_ratio=2.0,
               axes_dims_rope=(hidden // heads // 4,) * 4, rope_theta=2000, eps=1e-6, guidance_embeds=False)
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**cfg).eval()
    randomize_(model, seed)
    return model, cfg


def make_inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    h, w, t = 3, 4, 5
    img_ids = torch.cartesian_prod(torch.tensor([0]), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(t))
    return {
        "hidden_states": torch.randn(1, h * w, cfg["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, t, cfg["joint_attention_dim"], generator=g),
        "timestep": torch.tensor([0.61]),
        "img_ids": img_ids.to(torch.int64),
        "txt_ids": txt_ids.to(torch.int64),
    }


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def write_case(out, inputs, sample, extra=None):
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).contiguous() for k, v in inputs.items()}, out / "inputs.safetensors")
    save_file({"img_ids": inputs["img_ids"].contiguous(), "txt_ids": inputs["txt_ids"].contiguous()},
              out / "ids_int64.safetensors")
    save_file({"sample": sample.contiguous()}, out / "expected.safetensors")
    if extra:
        (out / "case.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# GGUF

def q4_k_blocks(x):
    """Quantize rows (length a multiple of 256) to GGML's Q4_K blocks: per 256 values an f16 d and
    dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of nibbles (value = d·sc·q − dmin·m)."""
    x = x.reshape(-1, 8, 32).astype(np.float32)
    lo, hi = x.min(axis=2), x.max(axis=2)
    mins = np.maximum(-lo, 0)
    scales = (hi + mins) / 15
    d = (scales.max(axis=1) / 63).astype(np.float16)
    dmin = (mins.max(axis=1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scales, df, out=np.zeros_like(scales), where=df > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(mins, dminf, out=np.zeros_like(mins), where=dminf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[:, :, None]
    offset = (dminf * m)[:, :, None]
    q = np.clip(np.round(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    # Each 32 bytes hold two sub-blocks: low nibbles the first, high nibbles the second.
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(x.shape[0], 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)


def write_gguf(path, bfl_sd, qtype):
    import gguf
    from gguf import GGMLQuantizationType as T

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_string("general.name", f"flux2 tiny transformer {qtype.name}")
    for name, v in sorted(bfl_sd.items()):
        a = v.to(torch.float32).numpy()
        if a.ndim == 2 and a.shape[1] % block == 0:
            if qtype == T.Q4_K:
                raw = q4_k_blocks(a).reshape(a.shape[0], -1)
                back = gguf.quants.dequantize(raw, T.Q4_K)
                assert np.abs(back - a).max() <= np.abs(a).max() / 8, name
            else:
                raw = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_gguf_case(name, hidden, qtype, seed):
    from diffusers import Flux2Transformer2DModel, GGUFQuantizationConfig

    out = OUT / name
    model, cfg = tiny_model(hidden, seed)
    inputs = make_inputs(cfg, seed + 1)
    bfl = bfl_layout.diffusers_to_bfl({k: v.detach().clone() for k, v in model.state_dict().items()})
    out.mkdir(parents=True, exist_ok=True)
    write_gguf(out / "transformer.gguf", bfl, qtype)
    config_dir = out / "_config"
    model.save_config(config_dir)
    loaded = Flux2Transformer2DModel.from_single_file(
        str(out / "transformer.gguf"), config=str(config_dir), local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32,
    ).eval()
    shutil.rmtree(config_dir)
    sample = forward(loaded, inputs)
    unquantized = forward(model, inputs)
    # diffusers decodes GGUF blocks in float16; the exact reference decodes them in float32 as
    # ggml does (the gguf package's numpy dequantiser) and runs the same diffusers model.
    import gguf
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    reader = gguf.GGUFReader(str(out / "transformer.gguf"))
    decoded = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
               .reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    model.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(decoded), strict=True)
    exact = forward(model, inputs)
    err = ((sample - unquantized).abs().max() / unquantized.abs().max()).item()
    f16 = ((sample - exact).abs().max() / exact.abs().max()).item()
    write_case(out, inputs, sample, {"type": qtype.name, "hidden": hidden, "rel_err_vs_unquantized": err,
                                     "rel_err_f16_decoding": f16})
    save_file({"sample": sample.contiguous(), "sample_exact": exact.contiguous()}, out / "expected.safetensors")
    print(f"{name}: {(out / 'transformer.gguf').stat().st_size} bytes, quantization error {err:.4f}, "
          f"diffusers' f16 decoding {f16:.2e}")


# A Qwen3 text encoder in llama.cpp's GGUF names, as the GGUF text encoders users run
# (tiny: 320 tokens, 3 layers; Q8_0 where rows are whole blocks, F32 norms).
LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_name(hf):
    if hf in LLAMA_NAMES:
        return LLAMA_NAMES[hf]
    layer, rest = hf[len("model.layers."):].split(".", 1)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LLAMA_NAMES[module]}.{suffix}"


def make_qwen3_gguf_case(seed):
    import gguf
    from gguf import GGMLQuantizationType as T
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = OUT / "qwen3_gguf"
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                      rope_theta=1_000_000.0, tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    randomize_(model, seed)
    path = out / "qwen3-tiny-Q8_0.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    for key, value in [("block_count", 3), ("embedding_length", 64), ("feed_forward_length", 128),
                       ("attention.head_count", 2), ("attention.head_count_kv", 1), ("attention.key_length", 32)]:
        w.add_uint32(f"qwen3.{key}", value)
    w.add_float32("qwen3.rope.freq_base", 1_000_000.0)
    w.add_float32("qwen3.attention.layer_norm_rms_epsilon", 1e-6)
    for name, v in model.model.state_dict().items():
        a = v.to(torch.float32).numpy()
        ln = llama_name("model." + name)
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(ln, gguf.quants.quantize(a, T.Q8_0), raw_dtype=T.Q8_0)
        else:
            w.add_tensor(ln, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Reference: transformers on ggml's exact f32 decoding of the file.
    reader = gguf.GGUFReader(str(path))
    by_llama = {llama_name("model." + n): "model." + n for n in model.model.state_dict()}
    decoded = {by_llama[t.name]: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                                                  .copy()).reshape([int(d) for d in reversed(t.shape)])
               for t in reader.tensors}
    decoded["lm_head.weight"] = decoded["model.embed_tokens.weight"]
    model.load_state_dict(decoded, strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 320, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    layers = (1, 2, 3)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    embeds = torch.stack([hs[k] for k in layers], dim=1).permute(0, 2, 1, 3).reshape(2, 12, 3 * 64)
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, out / "inputs.safetensors")
    save_file({"prompt_embeds": embeds.contiguous()}, out / "expected.safetensors")
    (out / "case.json").write_text(json.dumps({"out_layers": layers}, indent=2) + "\n")
    print(f"qwen3_gguf: {path.stat().st_size} bytes")


# ---------------------------------------------------------------------------------------------
# ComfyUI quantized files (comfy-kitchen's eager reference quantizers)

def comfy_quantize(bfl, fmt):
    """BFL weights -> (tensors to store, f32 weights they decode to), per comfy-kitchen."""
    from comfy_kitchen.backends.eager import quantization as q
    from comfy_kitchen.float_utils import F4_E2M1_MAX, F8_E4M3_MAX

    stored, decoded, markers = {}, {}, {}
    for name, v in sorted(bfl.items()):
        w = v.to(torch.float32)
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem is None or w.ndim != 2:
            stored[name], decoded[name] = w, w
            continue
        if fmt == "fp8":
            scale = (w.abs().max() / F8_E4M3_MAX).reshape(())
            codes = q.quantize_per_tensor_fp8(w, scale)
            stored[name], stored[f"{stem}.weight_scale"] = codes, scale.to(torch.float32)
            stored[f"{stem}.input_scale"] = torch.tensor(1.0)
            decoded[name] = q.dequantize_per_tensor_fp8(codes, scale, torch.float32)
        elif fmt == "nvfp4":
            scale = (w.abs().max() / (F8_E4M3_MAX * F4_E2M1_MAX)).to(torch.float32)
            codes, block = q.quantize_nvfp4(w, scale)
            stored[name], stored[f"{stem}.weight_scale"], stored[f"{stem}.weight_scale_2"] = codes, block, scale
            decoded[name] = q.dequantize_nvfp4(codes, scale, block, torch.float32)
            markers[stem] = {"format": "nvfp4"}
        elif fmt == "int8":
            group = 64
            if w.shape[1] % group == 0:
                codes, scale = q.quantize_int8_convrot_weight(w, group)
                decoded[name] = q.dequantize_int8_convrot_weight(codes, scale, group).to(torch.float32)
                markers[stem] = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": group}
            else:
                scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
                codes = torch.clamp(torch.round(w / scale), -128, 127).to(torch.int8)
                decoded[name] = q.dequantize_int8_simple(codes, scale).to(torch.float32)
                markers[stem] = {"format": "int8_tensorwise"}
            stored[name], stored[f"{stem}.weight_scale"] = codes, scale.to(torch.float32)
    return stored, decoded, markers


def make_comfy_case(fmt, seed):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    out = OUT / fmt
    model, cfg = tiny_model(64, seed)
    inputs = make_inputs(cfg, seed + 1)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The official -fp8 releases use diffusers names (q, k, v apart, one scale each); ComfyUI
    # files use BFL names (fused qkv quantized as one tensor).
    source = sd if fmt == "fp8" else bfl_layout.diffusers_to_bfl(sd)
    stored, decoded, markers = comfy_quantize(source, fmt)
    out.mkdir(parents=True, exist_ok=True)
    metadata = None
    if fmt == "fp8":
        file = out / "flux-2-klein-tiny-fp8.safetensors"
        decoded_diffusers = decoded
        keep = ["transformer_blocks.0.attn.to_k.weight", "single_transformer_blocks.0.attn.to_out.weight", "proj_out.weight"]
    else:
        decoded_diffusers = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in decoded.items()})
        keep = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight", "final_layer.linear.weight"]
        if fmt == "nvfp4":
            stored = {f"model.diffusion_model.{k}": v for k, v in stored.items()}
            for stem, conf in markers.items():
                data = torch.frombuffer(bytearray(json.dumps(conf).encode()), dtype=torch.uint8)
                stored[f"model.diffusion_model.{stem}.comfy_quant"] = data
            file = out / "flux-2-klein-tiny-nvfp4.safetensors"
        else:
            metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": markers})}
            file = out / "flux-2-klein-tiny-int8.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, file, metadata=metadata)
    model.load_state_dict(decoded_diffusers, strict=True)
    sample = forward(model, inputs)
    # A few decoded weights, under the file's own names, to check the decoding itself.
    save_file({k: decoded[k].contiguous() for k in keep}, out / "dequantized.safetensors")
    write_case(out, inputs, sample, {"format": fmt, "file": file.name})
    print(f"{fmt}: {file.stat().st_size} bytes")


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    from gguf import GGMLQuantizationType as T

    make_gguf_case("gguf_q8_0", 64, T.Q8_0, seed=3100)
    make_gguf_case("gguf_q4_k", 256, T.Q4_K, seed=3200)
    for i, fmt in enumerate(["fp8", "nvfp4", "int8"]):
        make_comfy_case(fmt, seed=3300 + i)
    make_qwen3_gguf_case(seed=3400)


if __name__ == "__main__":
    main()
