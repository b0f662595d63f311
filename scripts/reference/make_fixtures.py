#!/usr/bin/env python3
"""Generate the committed test fixtures from the Python reference (diffusers / transformers).

Every fixture is a tiny random model of the real architecture, run in float32 on the CPU.
Usage (from the repo root):

    python3 -m venv .venv-ref && .venv-ref/bin/pip install -r scripts/reference/requirements.txt
    .venv-ref/bin/python scripts/reference/make_fixtures.py [--only transformer|pipeline|workflows]

Output goes to tests/fixtures/. The script is deterministic (fixed seeds).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bfl_layout  # noqa: E402


def randomize_(module, seed, norm_jitter=0.2):
    """Re-draw every parameter: linear weights keep their init scale, norm scales become 1 + noise,
    so a swapped norm or chunk order changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + norm_jitter * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] * (p[0, 0].numel() if p.ndim > 2 else 1)
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def round_params_(module, dtype):
    """Round parameters through `dtype` so the stored weights reproduce the reference exactly."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Transformer fixtures (issue: foundation)

TRANSFORMER_CASES = [
    # name, config overrides, batch, grid (h, w), reference grid or None, text length, storage dtype, guidance, sharded
    dict(
        name="t2i_nonsquare",
        config=dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
                    mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4)),
        batch=1, grid=(3, 5), ref_grid=None, text_len=7, sigma=[0.73], dtype=torch.float32, guidance=None, shard=False,
    ),
    dict(
        name="batch2_hd24_ref",
        config=dict(in_channels=12, num_layers=3, num_single_layers=2, attention_head_dim=24,
                    num_attention_heads=2, joint_attention_dim=20, timestep_guidance_channels=16,
                    mlp_ratio=2.5, axes_dims_rope=(6, 6, 6, 6)),
        batch=2, grid=(4, 2), ref_grid=(2, 3), text_len=5, sigma=[0.91, 0.35], dtype=torch.bfloat16, guidance=None,
        shard=True,
    ),
    dict(
        name="guidance_outchannels",
        config=dict(in_channels=8, out_channels=6, num_layers=2, num_single_layers=3, attention_head_dim=8,
                    num_attention_heads=4, joint_attention_dim=12, timestep_guidance_channels=20,
                    mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True),
        batch=1, grid=(2, 3), ref_grid=None, text_len=4, sigma=[0.5], dtype=torch.float16, guidance=[3.5], shard=False,
    ),
]


def image_ids(t, h, w):
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


def make_transformer_case(case, seed):
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    out = FIXTURES / "transformer" / case["name"]
    if out.exists():
        shutil.rmtree(out)
    cfg = dict(patch_size=1, rope_theta=2000, eps=1e-6, guidance_embeds=False)
    cfg.update(case["config"])
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**cfg).eval()
    randomize_(model, seed)
    round_params_(model, case["dtype"])

    g = torch.Generator().manual_seed(seed + 1)
    b, (h, w) = case["batch"], case["grid"]
    ids = image_ids(0, h, w)
    if case["ref_grid"] is not None:
        ids = torch.cat([ids, image_ids(10, *case["ref_grid"])])
    li = ids.shape[0]
    inputs = {
        "hidden_states": torch.randn(b, li, cfg["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(b, case["text_len"], cfg["joint_attention_dim"], generator=g),
        "timestep": torch.tensor(case["sigma"], dtype=torch.float32),
        "img_ids": ids.to(torch.int64),
        "txt_ids": torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(case["text_len"])),
    }
    if case["guidance"] is not None:
        inputs["guidance"] = torch.tensor(case["guidance"], dtype=torch.float32)
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]

    # diffusers layout (optionally sharded, to exercise the index loader)
    model.to(case["dtype"]).save_pretrained(out / "transformer", max_shard_size="150KB" if case["shard"] else "10GB")
    model.to(torch.float32)
    # BFL single file of the same weights, checked against diffusers' own converter.
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = bfl_layout.diffusers_to_bfl(sd)
    back = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in bfl.items()})
    assert back.keys() == sd.keys(), set(back) ^ set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    save_file({k: v.to(case["dtype"]).contiguous() for k, v in bfl.items()}, out / "bfl.safetensors")

    # Inputs are stored as f32 (ids too: the CLI also accepts int ids) plus an int64 copy of the ids.
    stored = {k: v.to(torch.float32).contiguous() for k, v in inputs.items()}
    save_file(stored, out / "inputs.safetensors")
    save_file({"img_ids": inputs["img_ids"].contiguous(), "txt_ids": inputs["txt_ids"].contiguous()},
              out / "ids_int64.safetensors")
    save_file({"sample": sample.contiguous()}, out / "expected.safetensors")
    write_json(out / "case.json", {k: (str(v) if k == "dtype" else v) for k, v in case.items() if k != "config"})
    print(f"transformer/{case['name']}: sample {tuple(sample.shape)}, |sample| max {sample.abs().max():.3f}")


def make_transformer_fixtures():
    for i, case in enumerate(TRANSFORMER_CASES):
        make_transformer_case(case, seed=1000 + i)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["transformer", "pipeline", "workflows"])
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.only in (None, "transformer"):
        make_transformer_fixtures()
    if args.only in (None, "pipeline"):
        import make_pipeline_fixtures  # noqa: F401  (extended by the pipeline issue)
        make_pipeline_fixtures.main(FIXTURES)
    if args.only in (None, "workflows"):
        # Inpainting, img2img and KV cases on the committed pipeline (which they only read).
        import make_pipeline_fixtures

        make_pipeline_fixtures.make_workflow_fixtures(FIXTURES)
        make_pipeline_fixtures.make_kv_fixtures(FIXTURES)


if __name__ == "__main__":
    main()
