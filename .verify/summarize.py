#!/usr/bin/env python3
"""Fold the report folder of .verify/gpu_check.sh into REPORT/summary.json and REPORT/summary.txt
(the table gpu_check.sh prints last).

    python3 .verify/summarize.py REPORT_DIR [--quiet]

Reads whatever is there and tolerates anything missing or malformed (each part that could not be
read says why under "errors"): results.tsv (one row per step: name, status, rc, seconds, limit,
note), run.txt, nvidia-smi.csv, doctor.log, selftest.json, gpu-tests.log, the fixture steps' logs
(`flux2 compare` lines), the generate reports (klein4b-1024.json, small-*.json), bench_gemm.json,
profile_attention.json, attention_compare.json and peer_compare.json.

Exit status: 0 every step passed, 1 a step failed / timed out / was interrupted (or none ran),
2 nothing failed but steps were skipped for lack of time.
"""
import glob
import json
import math
import os
import re
import sys

BAD = ("fail", "timeout", "interrupted")


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def num(x):
    """A finite float, or None (serde_json writes NaN and infinities as null)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def steps_of(report, errors):
    steps = []
    try:
        lines = read(os.path.join(report, "results.tsv")).splitlines()
    except OSError as e:
        errors["steps"] = str(e)
        return steps
    for line in lines:
        if not line.strip():
            continue
        f = line.split("\t") + [""] * 6
        rc = f[2]
        steps.append({
            "name": f[0],
            "status": f[1],
            "rc": int(rc) if rc.lstrip("-").isdigit() else None,
            "seconds": num(f[3]) or 0.0,
            "limit_s": int(f[4]) if f[4].isdigit() else None,
            "note": f[5],
        })
    return steps


def run_info(report):
    info = {}
    try:
        for tok in read(os.path.join(report, "run.txt")).split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info[k] = v
    except OSError:
        pass
    # device=NAME has spaces: take the whole rest of its line.
    try:
        m = re.search(r"device=(.*)$", read(os.path.join(report, "run.txt")), re.M)
        if m:
            info["device"] = m.group(1).strip()
    except OSError:
        pass
    return info


def card_of(report, errors):
    card = {}
    try:
        rows = [r for r in read(os.path.join(report, "nvidia-smi.csv")).splitlines() if r.strip()]
        if rows and "," in rows[0]:
            parts = [p.strip() for p in rows[0].split(",")]
            for k, v in zip(("name", "driver", "memory", "compute_cap"), parts):
                card[k] = v
            if len(rows) > 1:
                card["gpus"] = len(rows)
        elif rows:
            errors["nvidia_smi"] = rows[0][:200]
    except OSError:
        pass
    try:
        doc = read(os.path.join(report, "doctor.log"))
        m = re.search(r"^gpu 0: (.*)$", doc, re.M)
        if m:
            card["flux2_device"] = m.group(1).strip()
            card["emulated"] = m.group(1).startswith("flux2 cuda-sim")
        m = re.search(r"^driver: (.*)$", doc, re.M)
        if m:
            card["flux2_driver"] = m.group(1).strip()
        m = re.search(r"compute capability: (\S+) \(kernel image (\S+)\)", doc)
        if m:
            card["flux2_compute_capability"], card["kernel_image"] = m.group(1), m.group(2)
        m = re.search(r"^gpu: not usable: (.*)$", doc, re.M)
        if m:
            card["device_error"] = m.group(1).strip()
    except OSError:
        pass
    return card


def selftest_of(report, errors):
    path = os.path.join(report, "selftest.json")
    if not os.path.exists(path):
        return None
    try:
        sel = json.loads(read(path))
        cases = []
        for o in sel.get("outcomes", []):
            rel, tol = num(o.get("rel_l2")), num(o.get("tolerance"))
            cases.append({
                "op": o.get("op"),
                "shape": o.get("shape"),
                "passed": bool(o.get("passed")),
                "rel_l2": rel,
                "max_abs": num(o.get("max_abs")),
                "tolerance": tol,
                "error_over_tolerance": rel / tol if rel is not None and tol else None,
                "nan": o.get("nan"),
                "micros": num(o.get("micros")),
                "error": o.get("error"),
            })
        rels = [c["rel_l2"] for c in cases if c["rel_l2"] is not None]
        ratios = [c for c in cases if c["error_over_tolerance"] is not None]
        worst = max(ratios, key=lambda c: c["error_over_tolerance"]) if ratios else None
        return {
            "device": sel.get("device"),
            "cases": len(cases),
            "passed": sum(c["passed"] for c in cases),
            "failed": [c for c in cases if not c["passed"]],
            "worst_rel_l2": max(rels) if rels else None,
            "worst_max_abs": max((c["max_abs"] for c in cases if c["max_abs"] is not None), default=None),
            "largest_error_over_tolerance": worst and {k: worst[k] for k in ("op", "shape", "rel_l2", "tolerance", "error_over_tolerance")},
            "outcomes": cases,
        }
    except Exception as e:  # noqa: BLE001 - the summary reports whatever went wrong
        errors["selftest"] = f"{type(e).__name__}: {e}"
        return None


COMPARE = re.compile(r"^(\S+): cosine (\S+)\s+rel_l2 (\S+)\s+max_abs (\S+)", re.M)
PIXELS = re.compile(r"pixels: mean abs error (\S+)/255, max (\d+)/255")
GT_PARITY = re.compile(r"^(transformer .*?|text encoder|vae encode|vae decode): cosine (\S+), rel_l2 (\S+)$", re.M)
GT_PIXELS = re.compile(r"^pipeline (.*?): mean absolute pixel error (\S+)/255$", re.M)
GT_TEST = re.compile(r"^test (\S+)\s+\.\.\. (ok|FAILED|ignored)", re.M)


def parities_of(report):
    out = {}
    for path in sorted(glob.glob(os.path.join(report, "forward-*.log")) + glob.glob(os.path.join(report, "generate-*.log"))):
        name = os.path.basename(path)[:-4]
        text = read(path)
        for key, cos, rel, mx in COMPARE.findall(text):
            out[name] = {"tensor": key, "cosine": num(cos), "rel_l2": num(rel), "max_abs": num(mx)}
        m = PIXELS.search(text)
        if m:
            out[name] = {"mean_pixel_error": num(m.group(1)), "max_pixel_error": int(m.group(2))}
    return out


def gpu_tests_of(report):
    path = os.path.join(report, "gpu-tests.log")
    if not os.path.exists(path):
        return None
    text = read(path)
    res = {"tests": dict(GT_TEST.findall(text)), "parities": []}
    for what, cos, rel in GT_PARITY.findall(text):
        res["parities"].append({"what": what, "cosine": num(cos), "rel_l2": num(rel)})
    for what, mad in GT_PIXELS.findall(text):
        res["parities"].append({"what": "pipeline " + os.path.basename(what), "mean_pixel_error": num(mad)})
    m = re.search(r"^test result: (.*)$", text, re.M)
    if m:
        res["result"] = m.group(1).strip()
    m = re.search(r"^(CUDA device: .*|error: FLUX2_EXPECT_GPU.*|no CUDA device .*)$", text, re.M)
    if m:
        res["device_line"] = m.group(1)
    return res


def generate_report(report, name, errors):
    path = os.path.join(report, name)
    if not os.path.exists(path):
        return None
    try:
        k = json.loads(read(path))
        runs = []
        for r in k.get("runs", []):
            s = r.get("seconds", {})
            runs.append({"width": r.get("width"), "height": r.get("height"), "steps": r.get("steps"),
                         **{key: num(s.get(key)) for key in ("encode", "references", "denoise", "per_step", "decode")}})
        peak = k.get("peak_device_bytes")
        return {"device": k.get("device"), "load_s": num(k.get("load_seconds")),
                "peak_device_gib": peak / 2**30 if isinstance(peak, (int, float)) else None, "runs": runs}
    except Exception as e:  # noqa: BLE001
        errors[name] = f"{type(e).__name__}: {e}"
        return None


def load_json(report, name, errors):
    path = os.path.join(report, name)
    if not os.path.exists(path):
        return None
    try:
        return json.loads(read(path))
    except Exception as e:  # noqa: BLE001
        errors[name] = f"{type(e).__name__}: {e}"
        return None


def median_ratio(rows, num_key, den_key):
    """The median of num/den over the rows that have both, or None."""
    r = sorted(num(x.get(num_key)) / num(x.get(den_key)) for x in rows
               if num(x.get(num_key)) and num(x.get(den_key)))
    return r[len(r) // 2] if r else None


def fmt(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def table(s):
    lines = []
    card, run = s["card"], s["run"]
    lines.append(f"== flux2 GPU check: {s['verdict'].upper()} ==")
    if card.get("name"):
        lines.append(f"card: {card['name']}, driver {card.get('driver', '?')}, {card.get('memory', '?')}, "
                     f"compute capability {card.get('compute_cap', '?')}")
    lines.append(f"flux2 device: {card.get('flux2_device') or card.get('device_error') or 'none'}"
                 + (" [EMULATED]" if card.get("emulated") else "")
                 + (f" ({card['flux2_driver']})" if card.get("flux2_driver") else ""))
    lines.append(f"mode: {({'1': 'small', '0': 'full'}).get(run.get('small'), '?')}, device {run.get('check_device', '?')}, "
                 f"{run.get('elapsed_s', '?')}s of a {run.get('budget_s', '?')}s budget"
                 + (f", INTERRUPTED by SIG{run['interrupted']}" if run.get("interrupted", "no") != "no" else ""))
    lines.append("")
    lines.append(f"{'status':<12} {'step':<40} {'seconds':>8} {'limit':>6}  note")
    for st in s["steps"]:
        note = st["note"] if len(st["note"]) <= 110 else st["note"][:107] + "..."
        lines.append(f"{st['status']:<12} {st['name']:<40} {st['seconds']:>8.1f} {fmt(st['limit_s'], 'd'):>6}  {note}")
    c = s["counts"]
    lines.append(f"-- {c['pass']} passed, {c['fail']} failed, {c['timeout']} timed out, {c['skipped']} skipped"
                 + (f", {c['interrupted']} interrupted" if c["interrupted"] else ""))
    sel = s.get("selftest")
    if sel:
        lines.append("")
        lines.append(f"selftest on {sel['device']}: {sel['cases']} cases, {sel['passed']} passed, "
                     f"{len(sel['failed'])} failed; worst rel_l2 {fmt(sel['worst_rel_l2'])}, worst max_abs {fmt(sel['worst_max_abs'])}")
        w = sel.get("largest_error_over_tolerance")
        if w:
            lines.append(f"  largest rel_l2/tolerance: {w['op']} {w['shape']}: rel_l2 {fmt(w['rel_l2'])} "
                         f"of {fmt(w['tolerance'])} ({w['error_over_tolerance']:.2f}x)")
        for f in sel["failed"][:20]:
            lines.append(f"  FAILED {f['op']} {f['shape']}: rel_l2 {fmt(f['rel_l2'])} (tol {fmt(f['tolerance'])}), "
                         f"max_abs {fmt(f['max_abs'])}, nan {f['nan']}" + (f": {f['error']}" if f.get("error") else ""))
        if len(sel["failed"]) > 20:
            lines.append(f"  ... and {len(sel['failed']) - 20} more (summary.json)")
    gt = s.get("gpu_tests")
    if gt:
        lines.append("")
        counts = {}
        for v in gt["tests"].values():
            counts[v] = counts.get(v, 0) + 1
        lines.append("gpu-tests: " + (gt.get("result") or ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test lines"))
        if gt.get("device_line"):
            lines.append(f"  {gt['device_line'][:150]}")
        for name, res in gt["tests"].items():
            if res == "FAILED":
                lines.append(f"  FAILED {name}")
        for p in gt["parities"]:
            if "cosine" in p:
                lines.append(f"  {p['what']}: cosine {fmt(p['cosine'], '.6f')}, rel_l2 {fmt(p['rel_l2'])}")
            else:
                lines.append(f"  {p['what']}: mean pixel error {fmt(p['mean_pixel_error'], '.3f')}/255")
    if s["parities"]:
        lines.append("")
        lines.append("CLI fixture parity:")
        for name, p in s["parities"].items():
            if "cosine" in p:
                lines.append(f"  {name:<40} cosine {fmt(p['cosine'], '.6f')}  rel_l2 {fmt(p['rel_l2'])}  max_abs {fmt(p['max_abs'])}")
            else:
                lines.append(f"  {name:<40} mean pixel error {fmt(p['mean_pixel_error'], '.3f')}/255, max {p['max_pixel_error']}/255")
    for key, label in (("klein4b_1024", "klein-4B (random weights) 1024x1024"), ("small_generate", "small pipeline")):
        k = s.get(key)
        if not k:
            continue
        lines.append("")
        lines.append(f"{label} on {k['device']}: load {fmt(k['load_s'], '.1f')}s, peak {fmt(k['peak_device_gib'], '.2f')} GiB")
        for i, r in enumerate(k["runs"]):
            ms = lambda x: fmt(None if x is None else x * 1e3, ".0f")  # noqa: E731
            lines.append(f"  run {i} ({r['width']}x{r['height']}, {r['steps']} steps): encode {ms(r['encode'])} ms, "
                         f"denoise {ms(r['denoise'])} ms ({fmt(None if r['per_step'] is None else r['per_step'] * 1e3, '.1f')} ms/step), "
                         f"decode {ms(r['decode'])} ms")
    b = s.get("bench_gemm")
    if b:
        lines.append("")
        lines.append(f"bench gemm: best bf16 {fmt(b['best_bf16_tflops'], '.1f')} TFLOP/s, best fp8 {fmt(b['best_fp8_tflops'], '.1f')} TFLOP/s "
                     f"over {b['shapes']} shapes; 128x256 tiles' gain over 128x128 (median, where they run) "
                     f"bf16 {fmt(b.get('wide_gain_bf16'), '.2f')}x, fp8 {fmt(b.get('wide_gain_fp8'), '.2f')}x")
    c = s.get("bench_conv")
    if c:
        lines.append(f"bench conv: the VAE decoder's convolutions (gpu_check: at 1024x1024) take {fmt(c['decoder_conv_ms'], '.2f')} ms")
    d = s.get("bench_dit")
    if d:
        lines.append("bench dit (klein-4B, 1024²): " + "; ".join(
            f"{r.get('mode')} {fmt(num(r.get('ms')), '.2f')} ms eager, {fmt(num(r.get('graph_ms')), '.2f')} ms graph"
            for r in d["results"]))
    a = s.get("profile_attention")
    if a:
        lines.append("attention: " + "; ".join(
            f"{r.get('path')} {fmt(num(r.get('ms')), '.3f')} ms, {fmt(num(r.get('tops')), '.1f')} TOPS, cosine {fmt(num(r.get('cosine')), '.6f')}"
            for r in a))
    ac = s.get("attention_compare")
    if ac:
        lines.append("attention vs torch SDPA: " + "; ".join(
            f"N={r['n']} H={r['heads']} d={r['d']}: SDPA ({r.get('sdpa_backend')}) {fmt(num(r.get('sdpa_ms')), '.3f')} ms, "
            f"{fmt(num(r.get('sdpa_tflops')), '.1f')} TFLOP/s; flux2 " + ", ".join(
                f"{x.get('path')} {fmt(num(x.get('ms')), '.3f')} ms" for x in (r.get("flux2") or []))
            for r in ac))
    p = s.get("peer_compare")
    if p:
        lines.append("peer (diffusers bf16 SDPA vs flux2): " + ", ".join(
            f"{k} {fmt(num(v), '.4g') if num(v) is not None else v}" for k, v in p.items() if k not in ("device",)))
    if s.get("emulator_coverage"):
        c = s["emulator_coverage"]
        lines.append(f"emulator: {c['kernels']} distinct kernels ran ({c['target_kernels']} kernel/target pairs)")
    if s["errors"]:
        lines.append("")
        for k, v in s["errors"].items():
            lines.append(f"could not read {k}: {v}")
    lines.append("")
    lines.append({"pass": "PASSED", "fail": "FAILED", "incomplete": "INCOMPLETE (steps skipped for lack of time)"}[s["verdict"]])
    return "\n".join(lines) + "\n"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quiet = "--quiet" in sys.argv[1:]
    report = args[0] if args else "."
    errors = {}
    steps = steps_of(report, errors)
    counts = {k: sum(st["status"] == k for st in steps) for k in ("pass", "fail", "timeout", "skipped", "interrupted")}
    no_time = [st["name"] for st in steps if st["status"] == "skipped" and st["note"].startswith("no time left")]
    run = run_info(report)
    if not steps or any(st["status"] in BAD for st in steps) or run.get("interrupted", "no") != "no":
        verdict = "fail"
    elif no_time:
        verdict = "incomplete"
    else:
        verdict = "pass"
    summary = {
        "verdict": verdict,
        "passed": verdict == "pass",
        "run": run,
        "card": card_of(report, errors),
        "counts": counts,
        "skipped_for_time": no_time,
        "steps": steps,
        "selftest": selftest_of(report, errors),
        "gpu_tests": gpu_tests_of(report),
        "parities": parities_of(report),
        "klein4b_1024": generate_report(report, "klein4b-1024.json", errors),
        "small_generate": None,
    }
    small = sorted(glob.glob(os.path.join(report, "small-*.json")))
    if small:
        summary["small_generate"] = generate_report(report, os.path.basename(small[0]), errors)
    bg = load_json(report, "bench_gemm.json", errors)
    if bg:
        rows = bg.get("results", [])
        summary["bench_gemm"] = {
            "device": bg.get("device"),
            "shapes": len(rows),
            "best_bf16_tflops": max((num(r.get("bf16_tflops")) or 0 for r in rows), default=None),
            "best_fp8_tflops": max((num(r.get("fp8_tflops")) or 0 for r in rows), default=None),
            # 128x128 tiles' time over the default's where the default ran 128x256 ones (> 1: wide wins).
            "wide_gain_bf16": median_ratio(rows, "bf16_narrow_tiles_ms", "bf16_ms"),
            "wide_gain_fp8": median_ratio(rows, "fp8_narrow_tiles_ms", "fp8_ms"),
            "results": rows,
        }
    bc = load_json(report, "bench_conv.json", errors)
    if bc:
        rows = bc.get("results", [])
        summary["bench_conv"] = {
            "device": bc.get("device"),
            "decoder_conv_ms": sum((num(r.get("ms")) or 0) * (r.get("runs") or 0) for r in rows),
            "results": rows,
        }
    bd = load_json(report, "bench_dit.json", errors)
    if bd:
        summary["bench_dit"] = {"device": bd.get("device"), "results": bd.get("results", [])}
    pa = load_json(report, "profile_attention.json", errors)
    if pa:
        summary["profile_attention"] = pa.get("results")
    ac = load_json(report, "attention_compare.json", errors)
    if ac:
        summary["attention_compare"] = ac.get("shapes")
    pc = load_json(report, "peer_compare.json", errors)
    if pc:
        summary["peer_compare"] = pc
    cov = os.path.join(report, "sim-coverage.txt")
    if os.path.exists(cov):
        kernels = {line.strip() for line in read(cov).splitlines() if line.strip()}
        summary["emulator_coverage"] = {"target_kernels": len(kernels),
                                        "kernels": len({k.split(" ", 1)[-1] for k in kernels})}
    summary["errors"] = errors
    text = table(summary)
    with open(os.path.join(report, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(report, "summary.txt"), "w") as f:
        f.write(text)
    if not quiet:
        print(text, end="")
    sys.exit({"pass": 0, "fail": 1, "incomplete": 2}[verdict])


if __name__ == "__main__":
    main()
