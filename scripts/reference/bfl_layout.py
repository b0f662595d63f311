"""diffusers -> BFL key mapping for the FLUX.2 transformer (the inverse of diffusers'
convert_flux2_transformer_checkpoint_to_diffusers; make_fixtures.py checks the round trip)."""

import re

import torch

SIMPLE = {
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
    "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "proj_out.weight": "final_layer.linear.weight",
}
DOUBLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight",
    "ff.linear_out.weight": "img_mlp.2.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight",
    "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
SINGLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}


def diffusers_to_bfl(sd):
    out = {}
    for k, v in sd.items():
        if k in SIMPLE:
            out[SIMPLE[k]] = v
        elif k == "norm_out.linear.weight":
            scale, shift = v.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", k):
            i, field = m.groups()
            if field in DOUBLE:
                out[f"double_blocks.{i}.{DOUBLE[field]}"] = v
            elif field == "attn.to_q.weight":
                qkv = [sd[f"transformer_blocks.{i}.attn.{n}.weight"] for n in ("to_q", "to_k", "to_v")]
                out[f"double_blocks.{i}.img_attn.qkv.weight"] = torch.cat(qkv)
            elif field == "attn.add_q_proj.weight":
                qkv = [sd[f"transformer_blocks.{i}.attn.{n}.weight"] for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
                out[f"double_blocks.{i}.txt_attn.qkv.weight"] = torch.cat(qkv)
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", k):
            i, field = m.groups()
            out[f"single_blocks.{i}.{SINGLE[field]}"] = v
        else:
            raise KeyError(k)
    return out
