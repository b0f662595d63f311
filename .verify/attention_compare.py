#!/usr/bin/env python3
"""Attention against PyTorch's SDPA on the GPU machine, in one run: for each shape, torch's
scaled_dot_product_attention (bf16; the flash backend where it takes the head dim, else the default
choice) timed with CUDA events, then `flux2 profile attention` on the same shape (every path it has:
exact, exact-v3 on sm_90a, exact-ref, sage, sage-v2 on sm_90a, sage-ref, with TOPS and the error against f32).

    python3 .verify/attention_compare.py --flux2 .verify/bin/flux2 --out REPORT [--shapes 4608x24x128,16384x1x512]
        [--first-json REPORT/profile_attention.json]

Writes attention_compare.json to --out (rewritten after every shape, so a run stopped at its time limit
still reports what it measured) and prints one table per shape with each path's speed against SDPA's.
Shapes are N x heads x d, batch 1: klein-4B's DiT at 1024² (4608 tokens, 24 heads of 128) and the VAE's
mid-block at 1024² (16,384 tokens, one head of 512). Needs torch with CUDA (the device image has it);
without it the torch column is left empty and flux2's rows are still recorded.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path


def sdpa_ms(n, heads, d, reps):
    """(milliseconds per call, backend) of torch SDPA at [1, heads, n, d] bf16, or (None, why)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        return None, f"torch not importable: {e}"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    backend = "default"
    ctx = None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if d <= 256:
            ctx, backend = sdpa_kernel(SDPBackend.FLASH_ATTENTION), "flash"
    except ImportError:
        pass

    def run():
        return F.scaled_dot_product_attention(q, k, v)

    def timed():
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    try:
        if ctx is not None:
            with ctx:
                return timed(), backend
        return timed(), backend
    except RuntimeError as e:  # e.g. the flash backend refusing this card or shape
        return None, f"sdpa ({backend}) failed: {e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flux2", required=True)
    ap.add_argument("--out", required=True, help="folder for attention_compare.json")
    ap.add_argument("--shapes", default="4608x24x128,16384x1x512", help="N x heads x d, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--first-json", help="where the first shape's `profile attention` JSON goes (default: --out)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"shapes": []}

    def save():
        with open(out / "attention_compare.json", "w") as f:
            json.dump(report, f, indent=2)

    failed = False
    for i, shape in enumerate(args.shapes.split(",")):
        n, heads, d = (int(x) for x in shape.lower().split("x"))
        flops = 4.0 * n * n * d * heads
        torch_ms, backend = sdpa_ms(n, heads, d, args.reps)
        entry = {"n": n, "heads": heads, "d": d, "sdpa_ms": torch_ms, "sdpa_backend": backend,
                 "sdpa_tflops": flops / (torch_ms * 1e-3) / 1e12 if torch_ms else None, "flux2": None}
        report["shapes"].append(entry)
        save()
        rows_file = Path(args.first_json) if i == 0 and args.first_json else out / f"profile_attention_{n}x{heads}x{d}.json"
        cmd = [args.flux2, "profile", "attention", "--seq", str(n), "--heads", str(heads), "--dim", str(d),
               "--reps", str(args.reps), "--device", args.device, "--json", str(rows_file)]
        r = subprocess.run(cmd)
        if r.returncode != 0:
            entry["flux2_error"] = f"{' '.join(cmd)} exited {r.returncode}"
            failed = True
            save()
            continue
        rows = json.load(open(rows_file))
        rows = rows.get("results", []) if isinstance(rows, dict) else rows
        entry["flux2"] = rows
        save()
        print(f"\nattention N={n} heads={heads} d={d}: torch SDPA ({backend}) "
              + (f"{torch_ms:.3f} ms, {entry['sdpa_tflops']:.1f} TFLOP/s" if torch_ms else "not timed"))
        print(f"{'path':<10} {'ms':>9} {'TOPS':>8} {'vs SDPA':>8} {'cosine':>9}")
        for row in rows:
            ms = row.get("ms")
            vs = f"{torch_ms / ms:.2f}x" if torch_ms and ms else "-"
            cos = row.get("cosine")
            print(f"{row.get('path', '?'):<10} {ms:>9.3f} {row.get('tops', 0):>8.1f} {vs:>8} "
                  f"{cos if cos is None else f'{cos:.6f}':>9}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
