#!/usr/bin/env python3
"""Fold the logs of .verify/gpu_check.sh into $OUT/summary.json and print the table."""
import json
import os
import sys

out = sys.argv[1]
rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "results.tsv")) if line.strip()]
summary = {"steps": [{"name": n, "rc": int(rc), "seconds": float(s)} for n, rc, s in rows]}
try:
    sel = json.load(open(os.path.join(out, "selftest.json")))
    finite = [o["rel_l2"] for o in sel["outcomes"] if o["rel_l2"] == o["rel_l2"]]
    summary["selftest"] = {"device": sel["device"], "cases": len(sel["outcomes"]),
                           "failed": [f'{o["op"]} {o["shape"]}' for o in sel["outcomes"] if not o["passed"]],
                           "worst_rel_l2": max(finite) if finite else None}
except Exception as e:  # noqa: BLE001 - the summary reports whatever went wrong
    summary["selftest"] = {"error": str(e)}
try:
    k = json.load(open(os.path.join(out, "klein4b-1024.json")))
    summary["klein4b_1024"] = {"device": k["device"], "load_s": k["load_seconds"],
                               "peak_device_gib": (k["peak_device_bytes"] or 0) / 2**30,
                               "runs": [r["seconds"] for r in k["runs"]]}
except Exception as e:  # noqa: BLE001
    summary["klein4b_1024"] = {"error": str(e)}
summary["passed"] = all(s["rc"] == 0 for s in summary["steps"])
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)

print("\n== GPU check summary ==")
for s in summary["steps"]:
    print(f'{"ok  " if s["rc"] == 0 else "FAIL"} {s["name"]:<40} {s["seconds"]:>7.1f}s')
sel = summary["selftest"]
if "cases" in sel:
    print(f'selftest: {sel["cases"]} cases, {len(sel["failed"])} failed, worst rel_l2 {sel["worst_rel_l2"]}')
    for f in sel["failed"]:
        print(f"  failed: {f}")
k = summary["klein4b_1024"]
if "runs" in k:
    print(f'klein-4B 1024x1024 on {k["device"]}: load {k["load_s"]:.1f}s, peak {k["peak_device_gib"]:.2f} GiB')
    for i, r in enumerate(k["runs"]):
        print(f'  run {i}: encode {r["encode"] * 1e3:.0f} ms, denoise {r["denoise"] * 1e3:.0f} ms '
              f'({r["per_step"] * 1e3:.1f} ms/step), decode {r["decode"] * 1e3:.0f} ms')
print("PASSED" if summary["passed"] else "FAILED")
sys.exit(0 if summary["passed"] else 1)
