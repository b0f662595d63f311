#!/usr/bin/env python3
"""Peer comparison on the GPU machine: diffusers' Flux2Transformer2DModel (bf16, SDPA) against
`flux2 bench dit` / `flux2 forward transformer` on the same random klein weights and inputs, in one run.

    python3 .verify/peer_compare.py --model WORK/klein-4b --flux2 .verify/bin/flux2 --out REPORT --work WORK/peer

Only small JSON goes to --out (peer_compare.json, rewritten after every stage so that a run stopped
at its time limit still reports what it measured, and bench_dit.json); the input and output
tensors (tens of MB) go to --work. Needs torch with CUDA (the device image has it) and diffusers
0.42.1: when it is not importable, every wheel in --wheels (default .verify/wheels, made by
.verify/build_for_gpu.sh and carried along) is installed into a temporary site folder.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def ensure_diffusers(wheels, work):
    """Make `from diffusers import Flux2Transformer2DModel` work (an older diffusers lacks it)."""
    try:
        from diffusers import Flux2Transformer2DModel  # noqa: F401
        return
    except ImportError:
        pass
    found = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    if not found:
        sys.exit(f"diffusers with Flux2Transformer2DModel is not installed and {wheels} holds no wheels "
                 "(run .verify/build_for_gpu.sh and carry .verify/wheels)")
    target = Path(work) / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *found], check=True)
    sys.path.insert(0, str(target))
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        del sys.modules[name]
    from diffusers import Flux2Transformer2DModel  # noqa: F401,F811


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="pipeline folder written by `flux2 synth`")
    ap.add_argument("--flux2", required=True)
    ap.add_argument("--out", required=True, help="folder for the JSON reports")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "flux2-peer"),
                    help="folder for the tensors")
    ap.add_argument("--wheels", default=str(Path(__file__).resolve().parent / "wheels"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = {"size": args.size, "stage": "start"}

    def save_rows(stage):
        rows["stage"] = stage
        with open(out / "peer_compare.json", "w") as f:
            json.dump(rows, f, indent=2)

    save_rows("installing diffusers")
    ensure_diffusers(args.wheels, work)
    import torch
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file, save_file

    dev = "cuda"
    if not torch.cuda.is_available():
        save_rows("no CUDA device for torch")
        sys.exit("torch sees no CUDA device")
    rows["device"] = torch.cuda.get_device_name()
    save_rows("loading diffusers' transformer")
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
    in_path = work / "dit_inputs.safetensors"
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
    save_file({"sample": ref.float().cpu().contiguous()}, work / "dit_diffusers.safetensors")
    del model
    torch.cuda.empty_cache()
    rows["diffusers_bf16_sdpa_ms"] = diffusers_ms
    save_rows("diffusers timed")
    for precision, attention in (("bf16", "exact"), ("fp8", "exact"), ("fp8", "sage")):
        o = work / f"dit_flux2_{precision}_{attention}.safetensors"
        subprocess.run([args.flux2, "forward", "transformer", "--model", args.model, "--inputs", str(in_path), "--out", str(o),
                        "--device", "cuda", "--precision", precision, "--attention", attention], check=True)
        a = load_file(o)["sample"].float()
        b = load_file(work / "dit_diffusers.safetensors")["sample"].float()
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        rows[f"cosine_{precision}_{attention}"] = cos
        save_rows(f"flux2 {precision}/{attention} compared")
    bench = out / "bench_dit.json"
    subprocess.run([args.flux2, "bench", "dit", "--model", args.model, "--width", str(args.size), "--height", str(args.size),
                    "--device", "cuda", "--reps", str(args.reps), "--json", str(bench)], check=True)
    for r in json.load(open(bench))["results"]:
        rows[f"flux2_{r['mode'].replace('/', '_')}_ms"] = r["ms"]
    save_rows("done")
    print(json.dumps(rows, indent=2))
    ok = rows["cosine_bf16_exact"] >= 0.995
    print("bf16 parity with diffusers:", "ok" if ok else "FAILED (cosine < 0.995)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
