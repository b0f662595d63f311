#!/usr/bin/env python3
"""Peer comparison on the GPU machine: diffusers' Flux2Transformer2DModel (bf16, SDPA) against
`flux2 bench dit` / `flux2 forward transformer` on the same random klein weights and inputs, in one run.

    python3 .verify/peer_compare.py --model WORK/klein-4b --flux2 .verify/bin/flux2 --out OUT

Needs torch with CUDA (the device image has it) and diffusers 0.42.1: installed from
.verify/wheels/ (carried along: `pip download diffusers==0.42.1 --no-deps -d .verify/wheels`) when
it is not importable.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def ensure_diffusers(wheels):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        target = Path(os.environ.get("TMPDIR", "/tmp")) / "flux2-peer-pkgs"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
                        "--no-deps", "--target", str(target), "diffusers==0.42.1"], check=True)
        sys.path.insert(0, str(target))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="pipeline folder written by `flux2 synth`")
    ap.add_argument("--flux2", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_diffusers(Path(__file__).resolve().parent / "wheels")
    import torch
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file, save_file

    dev = "cuda"
    model = Flux2Transformer2DModel.from_pretrained(Path(args.model) / "transformer", torch_dtype=torch.bfloat16).to(dev).eval()
    cfg = model.config
    h = w = args.size // 16
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, h * w, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 512, cfg.joint_attention_dim, generator=g),
        "timestep": torch.tensor([0.9]),
        "img_ids": torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).float(),
        "txt_ids": torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(512)).float(),
    }
    in_path = out / "dit_inputs.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, in_path)
    dev_in = {k: v.to(dev, torch.bfloat16 if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype) for k, v in inputs.items()}
    with torch.no_grad():
        for _ in range(2):
            ref = model(**dev_in, return_dict=False)[0]
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model(**dev_in, return_dict=False)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    times.sort()
    diffusers_ms = times[len(times) // 2]
    save_file({"sample": ref.float().cpu().contiguous()}, out / "dit_diffusers.safetensors")
    del model
    torch.cuda.empty_cache()

    rows = {"device": torch.cuda.get_device_name(), "size": args.size, "diffusers_bf16_sdpa_ms": diffusers_ms}
    for precision, attention in (("bf16", "exact"), ("fp8", "exact"), ("fp8", "sage")):
        o = out / f"dit_flux2_{precision}_{attention}.safetensors"
        subprocess.run([args.flux2, "forward", "transformer", "--model", args.model, "--inputs", str(in_path), "--out", str(o),
                        "--device", "cuda", "--precision", precision, "--attention", attention], check=True)
        a = load_file(o)["sample"].float()
        b = load_file(out / "dit_diffusers.safetensors")["sample"].float()
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        rows[f"cosine_{precision}_{attention}"] = cos
    bench = out / "bench_dit.json"
    subprocess.run([args.flux2, "bench", "dit", "--model", args.model, "--width", str(args.size), "--height", str(args.size),
                    "--device", "cuda", "--reps", str(args.reps), "--json", str(bench)], check=True)
    for r in json.load(open(bench))["results"]:
        rows[f"flux2_{r['mode']}_ms"] = r["ms"]
    json.dump(rows, open(out / "peer_compare.json", "w"), indent=2)
    print(json.dumps(rows, indent=2))
    ok = rows["cosine_bf16_exact"] >= 0.995
    print("bf16 parity with diffusers:", "ok" if ok else "FAILED (cosine < 0.995)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
