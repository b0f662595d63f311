"""The PyTorch side of scripts/bench-cpu-vs-torch.sh (diffusers 0.42.1, bf16, CPU).

  noise SIDE OUT.safetensors          write the shared noise [1, 128, SIDE/16, SIDE/16] (f32, seed 0)
  run MODEL SIDE NOISE OUT.json PROMPT  one 1-step Flux2KleinPipeline run in bf16: stage times, peak memory
  table OUT_DIR SIDE...               the side-by-side table from both programs' JSON reports
"""

import glob
import json
import os
import statistics
import sys
import threading
import time


def status():
    """This process's VmHWM / RssAnon / RssFile in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def noise(side, path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"noise": torch.randn(1, 128, side // 16, side // 16, generator=g)}, path)


def run(model, side, noise_path, out_path, prompt):
    # Peak anonymous memory is not kept by the kernel: sample it (as flux2 does).
    peak_anon = [0]

    def sample():
        while True:
            peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    import torch
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import load_file

    start = time.time()
    pipe = Flux2KleinPipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
    load = time.time() - start
    times = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.time()
            result = fn(*args, **kwargs)
            times[name] = times.get(name, 0.0) + time.time() - t
            return result

        return wrapper

    pipe.text_encoder.forward = timed("encode", pipe.text_encoder.forward)
    pipe.transformer.forward = timed("denoise", pipe.transformer.forward)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    latents = load_file(noise_path)["noise"]
    with torch.inference_mode():
        pipe(prompt=prompt, width=side, height=side, num_inference_steps=1, latents=latents)
    s = status()
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_seconds": load,
        "seconds": times,
        "peak_resident_bytes": s["VmHWM"],
        "peak_anonymous_bytes": max(peak_anon[0], s["RssAnon"]),
    }
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def table(out_dir, sides):
    """Each stage's median over the rounds (range in brackets when there are several), the ratio
    of the medians, and in how many rounds flux2 was at or below torch."""
    gib = 1 << 30
    print("| side | stage | flux2 bf16 | torch bf16 | flux2 / torch (medians) | rounds flux2 ≤ torch |")
    print("|---|---|---|---|---|---|")

    def cell(values, unit):
        med = statistics.median(values)
        if len(values) == 1:
            return f"{med:.1f} {unit}"
        return f"{med:.1f} {unit} ({min(values):.1f}–{max(values):.1f})"

    for side in sides:
        rounds = sorted(
            int(p.rsplit("-r", 1)[1].split(".")[0]) for p in glob.glob(f"{out_dir}/flux2-{side}-r*.json")
        )
        stages = {name: ([], []) for name in ("load", "text encode", "DiT forward", "VAE decode", "whole process (wall)")}
        anon, resident = ([], []), ([], [])
        for r in rounds:
            f = json.load(open(f"{out_dir}/flux2-{side}-r{r}.json"))
            t = json.load(open(f"{out_dir}/torch-{side}-r{r}.json"))
            fw = float(open(f"{out_dir}/flux2-{side}-r{r}.wall").read().split()[-1])
            tw = float(open(f"{out_dir}/torch-{side}-r{r}.wall").read().split()[-1])
            fs = f["runs"][0]["seconds"]
            pairs = {
                "load": (sum(c["seconds"] for c in f["component_loads"]), t["load_seconds"]),
                "text encode": (fs["encode"], t["seconds"].get("encode", 0.0)),
                "DiT forward": (fs["denoise"], t["seconds"].get("denoise", 0.0)),
                "VAE decode": (fs["decode"], t["seconds"].get("decode", 0.0)),
                "whole process (wall)": (fw, tw),
            }
            for name, (a, b) in pairs.items():
                stages[name][0].append(a)
                stages[name][1].append(b)
            anon[0].append(f["host_memory"]["peak_anonymous_bytes"] / gib)
            anon[1].append(t["peak_anonymous_bytes"] / gib)
            resident[0].append(f["host_memory"]["peak_resident_bytes"] / gib)
            resident[1].append(t["peak_resident_bytes"] / gib)
        for name, (a, b) in stages.items():
            ratio = statistics.median(a) / statistics.median(b) if statistics.median(b) else float("nan")
            wins = sum(x <= y for x, y in zip(a, b))
            print(f"| {side}² | {name} | {cell(a, 's')} | {cell(b, 's')} | {ratio:.2f}× | {wins}/{len(a)} |")
        print(f"| {side}² | peak anonymous | {max(anon[0]):.2f} GiB | {max(anon[1]):.2f} GiB | | |")
        print(f"| {side}² | peak resident | {max(resident[0]):.2f} GiB | {max(resident[1]):.2f} GiB | | |")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "noise":
        noise(int(sys.argv[2]), sys.argv[3])
    elif cmd == "run":
        run(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    elif cmd == "table":
        table(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
