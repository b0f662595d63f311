#!/usr/bin/env python3
"""LoRA fixtures: adapter files in every format flux2 reads, for the tiny transformer of
tests/fixtures/transformer/t2i_nonsquare (the pipeline fixture's transformer has the same shapes),
and the outputs of diffusers 0.42.1 + peft with them loaded.

- LoRA formats (BFL/ai-toolkit, PEFT-wrapped, kohya, diffusers/PEFT with adapter metadata): loaded
  by diffusers' own `load_lora_weights` (its converters), set_adapters for two LoRAs at once.
- LoKr and LoHa: against a merge written here from the LyCORIS definition (functional
  `diff_weight`): ΔW = kron(w1, w2)·alpha/rank (rank of the first factorised side, scale 1 when
  both are full); ΔW = (w1_a·w1_b)⊙(w2_a·w2_b)·alpha/rank (rank = rows of w1_b). The merge is
  done in BFL names and converted back with diffusers' own checkpoint converter.
- The pipeline case t2i_nonsquare with the BFL LoRA at 0.7 (the CLI test).

Usage: .venv-ref/bin/python scripts/reference/make_lora_fixtures.py  (pip install -r
scripts/reference/requirements-lora.txt). Deterministic (fixed seeds).
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "lora"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bfl_layout  # noqa: E402

D, M = 32, 96  # hidden, mlp hidden of the tiny config
RANK = 4

# BFL module -> [out, in]
BFL_MODULES = {
    "double_blocks.0.img_attn.qkv": (3 * D, D),
    "double_blocks.1.img_attn.qkv": (3 * D, D),
    "double_blocks.0.txt_attn.qkv": (3 * D, D),
    "double_blocks.0.img_attn.proj": (D, D),
    "double_blocks.1.txt_attn.proj": (D, D),
    "double_blocks.0.img_mlp.0": (2 * M, D),
    "double_blocks.0.img_mlp.2": (D, M),
    "double_blocks.1.txt_mlp.0": (2 * M, D),
    "double_blocks.1.txt_mlp.2": (D, M),
    "single_blocks.0.linear1": (3 * D + 2 * M, D),
    "single_blocks.1.linear1": (3 * D + 2 * M, D),
    "single_blocks.1.linear2": (D, D + M),
    "double_stream_modulation_img.lin": (6 * D, D),
    "single_stream_modulation.lin": (3 * D, D),
    # Not final_layer.adaLN_modulation.1: diffusers 0.42.1's LoRA converter maps it onto
    # norm_out.linear without swapping lora_B's (shift, scale) halves, as its weight converter
    # does; the LoHa file checks that module against a merge through the weight converter.
    "img_in": (D, 16),
    "txt_in": (D, 24),
    "final_layer.linear": (16, D),
    "time_in.in_layer": (D, 32),
}

# diffusers module -> [out, in]
DIFFUSERS_MODULES = {
    "transformer_blocks.0.attn.to_q": (D, D),
    "transformer_blocks.0.attn.to_k": (D, D),
    "transformer_blocks.1.attn.add_v_proj": (D, D),
    "transformer_blocks.1.attn.to_out.0": (D, D),
    "transformer_blocks.0.ff_context.linear_out": (D, M),
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj": (3 * D + 2 * M, D),
    "single_transformer_blocks.1.attn.to_out": (D, D + M),
    "norm_out.linear": (2 * D, D),
    "proj_out": (16, D),
    "x_embedder": (D, 16),
}


def factors(modules, seed, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in modules.items():
        down = torch.randn(rank, i, generator=g) / i**0.5
        up = torch.randn(o, rank, generator=g) * 0.5 / rank**0.5
        out[name] = (down, up)
    return out


def transformer(case="t2i_nonsquare"):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(FIXTURES / "transformer" / case / "transformer",
                                                   torch_dtype=torch.float32).eval()


def forward(model, case="t2i_nonsquare"):
    inputs = load_file(FIXTURES / "transformer" / case / "inputs.safetensors")
    inputs["img_ids"] = inputs["img_ids"].to(torch.int64)
    inputs["txt_ids"] = inputs["txt_ids"].to(torch.int64)
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def with_diffusers(files_and_scales):
    """The transformer output with these LoRA files loaded by diffusers (+ peft)."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer())
    names = []
    for i, (path, _) in enumerate(files_and_scales):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in files_and_scales])
    return forward(pipe.transformer)


def with_bfl_deltas(deltas):
    """The transformer output with dense deltas (BFL names) merged into the weights."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model = transformer()
    bfl = bfl_layout.diffusers_to_bfl({k: v.clone() for k, v in model.state_dict().items()})
    for name, delta in deltas.items():
        bfl[name + ".weight"] = bfl[name + ".weight"] + delta
    model.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(bfl))
    return forward(model)


def kohya(name):
    return "lora_unet_" + name.replace(".", "_")


def lokr_modules(seed):
    """LoKr modules in kohya/LyCORIS names and their reference deltas (LyCORIS diff_weight)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    tensors, deltas = {}, {}
    # w1 full [4, 2] and w2 factorised [24, 2]·[2, 16]: rank 2, alpha 1 -> scale 1/2.
    n = "double_blocks.0.img_attn.qkv"
    w1, w2a, w2b = r(4, 2), r(24, 2), r(2, 16)
    tensors.update({f"{kohya(n)}.lokr_w1": w1, f"{kohya(n)}.lokr_w2_a": w2a, f"{kohya(n)}.lokr_w2_b": w2b,
                    f"{kohya(n)}.alpha": torch.tensor(1.0)})
    deltas[n] = torch.kron(w1, w2a @ w2b) * (1.0 / 2)
    # Both sides factorised: rank from w1_a (3), alpha 6 -> scale 2.
    n = "single_blocks.0.linear1"
    w1a, w1b, w2a, w2b = r(8, 3), r(3, 4), r(36, 3), r(3, 8)
    tensors.update({f"{kohya(n)}.lokr_w1_a": w1a, f"{kohya(n)}.lokr_w1_b": w1b, f"{kohya(n)}.lokr_w2_a": w2a,
                    f"{kohya(n)}.lokr_w2_b": w2b, f"{kohya(n)}.alpha": torch.tensor(6.0)})
    deltas[n] = torch.kron(w1a @ w1b, w2a @ w2b) * (6.0 / 3)
    # Both full: scale 1, the stored alpha (5) is not used.
    n = "double_blocks.1.img_mlp.2"
    w1, w2 = r(4, 8), r(8, 12) * 0.2
    tensors.update({f"{kohya(n)}.lokr_w1": w1, f"{kohya(n)}.lokr_w2": w2, f"{kohya(n)}.alpha": torch.tensor(5.0)})
    deltas[n] = torch.kron(w1, w2)
    return tensors, deltas


def loha_modules(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.4  # noqa: E731
    tensors, deltas = {}, {}
    for n, (o, i), rank, alpha in [("double_blocks.0.txt_mlp.0", (2 * M, D), 3, 6.0),
                                   ("final_layer.adaLN_modulation.1", (2 * D, D), 2, None)]:
        w1a, w1b, w2a, w2b = r(o, rank), r(rank, i), r(o, rank), r(rank, i)
        tensors.update({f"{kohya(n)}.hada_w1_a": w1a, f"{kohya(n)}.hada_w1_b": w1b, f"{kohya(n)}.hada_w2_a": w2a,
                        f"{kohya(n)}.hada_w2_b": w2b})
        if alpha is not None:
            tensors[f"{kohya(n)}.alpha"] = torch.tensor(alpha)
        deltas[n] = (w1a @ w1b) * (w2a @ w2b) * ((alpha / rank) if alpha is not None else 1.0)
    return tensors, deltas


def save(tensors, name, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / name, metadata=metadata)
    return OUT / name


def main():
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    expected = {"base": forward(transformer())}

    bfl = factors(BFL_MODULES, 1)
    bfl_file = save({f"diffusion_model.{n}.lora_{ab}.weight": (d if ab == "A" else u)
                     for n, (d, u) in bfl.items() for ab in "AB"}, "bfl.safetensors")
    expected["bfl"] = with_diffusers([(bfl_file, 1.0)])
    wrapped = save({f"base_model.model.{n}.lora_{ab}.weight": (d if ab == "A" else u)
                    for n, (d, u) in bfl.items() for ab in "AB"}, "peft_wrapped.safetensors")
    expected["peft_wrapped"] = with_diffusers([(wrapped, 1.0)])
    # kohya: the same factors with alpha 8 at rank 4 (scale 2). diffusers' kohya converter skips
    # the modulation and final adaLN modules (it warns), so they stay out of this reference; the
    # LoHa file covers kohya names for the final adaLN.
    k = {}
    for n, (d, u) in bfl.items():
        if "modulation" in n:
            continue
        k.update({f"{kohya(n)}.lora_down.weight": d, f"{kohya(n)}.lora_up.weight": u, f"{kohya(n)}.alpha": torch.tensor(8.0)})
    kohya_file = save(k, "kohya.safetensors")
    expected["kohya"] = with_diffusers([(kohya_file, 1.0)])

    dif = factors(DIFFUSERS_MODULES, 2)
    meta = {"transformer.r": RANK, "transformer.lora_alpha": 8, "transformer.target_modules": sorted(DIFFUSERS_MODULES)}
    dif_file = save({f"transformer.{n}.lora_{ab}.weight": (d if ab == "A" else u)
                     for n, (d, u) in dif.items() for ab in "AB"}, "diffusers.safetensors",
                    {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    expected["diffusers"] = with_diffusers([(dif_file, 1.0)])
    # Old diffusers spelling, no alpha: scale 1; diffusers reads the same factors as lora_A/B.
    old = save({f"transformer.{n}.lora.{'down' if ab == 'A' else 'up'}.weight": (d if ab == "A" else u)
                for n, (d, u) in dif.items() for ab in "AB"}, "diffusers_old.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.safetensors"
        save_file({f"transformer.{n}.lora_{ab}.weight": (d if ab == "A" else u).contiguous()
                   for n, (d, u) in dif.items() for ab in "AB"}, plain)
        expected["diffusers_old"] = with_diffusers([(plain, 1.0)])
    del old

    expected["two"] = with_diffusers([(bfl_file, 0.7), (dif_file, -0.4)])

    lokr, lokr_deltas = lokr_modules(3)
    save(lokr, "lokr.safetensors")
    expected["lokr"] = with_bfl_deltas(lokr_deltas)
    loha, loha_deltas = loha_modules(4)
    save(loha, "loha.safetensors")
    expected["loha"] = with_bfl_deltas(loha_deltas)

    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "expected.safetensors")
    for name, v in expected.items():
        print(f"{name}: |out - base| max {(v - expected['base']).abs().max():.4f}")

    make_pipeline_case(bfl_file)


def make_pipeline_case(lora_file):
    """The pipeline fixture's t2i_nonsquare case with the BFL LoRA at 0.7, as diffusers renders it."""
    from diffusers import Flux2KleinPipeline

    case = FIXTURES / "cases" / "t2i_nonsquare"
    meta = json.loads((case / "case.json").read_text())
    pipe = Flux2KleinPipeline.from_pretrained(FIXTURES / "pipeline", torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora_file), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.7])
    noise = load_file(case / "noise.safetensors")["noise"]
    with torch.no_grad():
        pil = pipe(prompt=meta["prompt"], width=meta["width"], height=meta["height"], num_inference_steps=meta["steps"],
                   guidance_scale=meta["guidance"], latents=noise, output_type="pil").images[0]
    pil.save(OUT / "pipeline_t2i_nonsquare_bfl_0.7.png")
    print("pipeline: t2i_nonsquare with bfl.safetensors at 0.7")


if __name__ == "__main__":
    main()
