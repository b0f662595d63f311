#!/usr/bin/env python3
"""Registers, stack, spills and static shared memory per kernel, as ptxas reports them: compiles
kernels/<module>.cu with the repo's NVRTC (.cuda/, scripts/install-nvrtc.sh) and `-Xptxas -v`, the way
build.rs compiles it, for each cubin target. No GPU needed.

    scripts/ptxas_report.py attention_wide attention_v3 [--arch sm_80,sm_89]
"""
import ctypes
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, ".cuda/nvidia/cuda_nvrtc/lib")
INCLUDE = os.path.join(ROOT, ".cuda/nvidia/cuda_runtime/include")


def load_nvrtc():
    # NVRTC finds its builtins library by bare soname: load it by path first (as build.rs does).
    for lib in sorted(glob.glob(os.path.join(LIB, "libnvrtc-builtins.so*"))):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(os.path.join(LIB, "libnvrtc.so.12"), mode=ctypes.RTLD_GLOBAL)


def compile_log(nvrtc, path, arch):
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    name = os.path.basename(path).encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "-lineinfo", f"--include-path={INCLUDE}",
            f"--include-path={os.path.join(ROOT, 'kernels')}", "--ptxas-options=-v"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, buf)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    log = buf.value.decode(errors="replace")
    if rc != 0:
        sys.exit(f"{path} ({arch}) failed to compile:\n{log}")
    return log


def summarize(log):
    """(kernel, registers, stack, spill stores, spill loads, static smem) per entry."""
    rows, kernel, frame = [], None, (0, 0, 0)
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            frame = tuple(int(x) for x in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and kernel:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((kernel, int(m.group(1)), *frame, int(smem.group(1)) if smem else 0))
            kernel = None
    return rows


def main():
    args = sys.argv[1:]
    archs = ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_120"]
    if "--arch" in args:
        i = args.index("--arch")
        archs = args[i + 1].split(",")
        del args[i : i + 2]
    nvrtc = load_nvrtc()
    print(f"{'kernel':<40} {'arch':<7} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9} {'smem':>6}")
    for module in args or ["attention"]:
        for arch in archs:
            for row in summarize(compile_log(nvrtc, os.path.join(ROOT, "kernels", f"{module}.cu"), arch)):
                k, regs, stack, st, ld, smem = row
                print(f"{k:<40} {arch:<7} {regs:>5} {stack:>6} {st:>9} {ld:>9} {smem:>6}")


if __name__ == "__main__":
    main()
