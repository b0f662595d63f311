#!/usr/bin/env python3
"""GGUF fixtures for the dequantisation tests: one tensor per GGML type with random blocks (valid
f16 scales, every other byte random), and next to each its float32 values as the `gguf` package's
numpy dequantiser computes them (`<name>.expected`). Deterministic.

    python3 -m venv .venv-gguf && .venv-gguf/bin/pip install gguf==0.19.0 numpy==2.4.6
    .venv-gguf/bin/python scripts/reference/make_gguf_fixtures.py
"""

from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf" / "types.gguf"

# type -> byte ranges that hold f16 scales inside one block (kept finite and moderate)
SCALES = {
    T.Q4_0: [(0, 2)],
    T.Q4_1: [(0, 2), (2, 4)],
    T.Q5_0: [(0, 2)],
    T.Q5_1: [(0, 2), (2, 4)],
    T.Q8_0: [(0, 2)],
    T.Q2_K: [(80, 82), (82, 84)],
    T.Q3_K: [(108, 110)],
    T.Q4_K: [(0, 2), (2, 4)],
    T.Q5_K: [(0, 2), (2, 4)],
    T.Q6_K: [(208, 210)],
}


def main():
    rng = np.random.default_rng(20261202)
    w = gguf.GGUFWriter(str(OUT), "flux")
    w.add_string("general.name", "flux2 dequantisation fixture")
    for qtype, ranges in SCALES.items():
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = 3, 2 * 256 if block == 256 else 3 * 32
        n_blocks = rows * cols // block
        raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for a, b in ranges:
            scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
            raw[:, a:b] = scale.view(np.uint8).reshape(n_blocks, 2)
        expected = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32)
        assert expected.shape == (rows, cols) and np.isfinite(expected).all()
        name = f"t.{qtype.name.lower()}"
        w.add_tensor(name, raw.reshape(rows, -1), raw_dtype=qtype)
        w.add_tensor(name + ".expected", expected)
    values = rng.standard_normal((5, 7)).astype(np.float32)
    w.add_tensor("t.f32", values)
    w.add_tensor("t.f16", values.astype(np.float16))
    bf16 = gguf.quants.quantize(values, T.BF16)
    w.add_tensor("t.bf16", bf16, raw_dtype=T.BF16)
    w.add_tensor("t.bf16.expected", gguf.quants.dequantize(bf16, T.BF16).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
