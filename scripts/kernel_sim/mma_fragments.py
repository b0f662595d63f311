#!/usr/bin/env python3
"""Desk check of the tensor-core kernels' thread/fragment index math, without a GPU.

Models one warp executing ldmatrix (.x4, optionally .trans) and mma.sync.m16n8k16 with the
fragment layouts of the PTX ISA, then runs exactly the addressing of kernels/gemm.cu (warp tile of
gemm_mma_bf16) and kernels/attention.cu (one 16-row warp of flash_attention<D>) on random data and
compares with numpy. It checks that the A/B/C mappings the kernels assume agree with each other;
it cannot catch a misreading of the PTX layouts shared by model and kernel.

    python3 scripts/kernel_sim/mma_fragments.py
"""
import numpy as np

rng = np.random.default_rng(0)


def ldmatrix_x4(smem, addr_of_lane, trans=False):
    """smem: 2-D array; addr_of_lane(lane) -> (row, col) of the 8-element row this lane points at.
    Returns regs[lane][j] = (lo, hi) values for matrices j = 0..3."""
    mats = []
    for j in range(4):
        rows = [addr_of_lane(8 * j + r) for r in range(8)]
        mats.append(np.array([smem[r, c:c + 8] for r, c in rows]))  # 8x8 as stored
    regs = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        out = []
        for m in mats:
            if trans:
                out.append((m[2 * t, g], m[2 * t + 1, g]))
            else:
                out.append((m[g, 2 * t], m[g, 2 * t + 1]))
        regs.append(out)
    return regs


def mma(acc, a, b):
    """acc[lane] = 4 floats (C frag), a[lane] = 4 regs (A frag), b[lane] = 2 regs (B frag)."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        (a0, a1), (a2, a3), (a4, a5), (a6, a7) = a[lane]
        A[g, 2 * t], A[g, 2 * t + 1] = a0, a1
        A[g + 8, 2 * t], A[g + 8, 2 * t + 1] = a2, a3
        A[g, 2 * t + 8], A[g, 2 * t + 9] = a4, a5
        A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9] = a6, a7
        (b0, b1), (b2, b3) = b[lane]
        B[2 * t, g], B[2 * t + 1, g] = b0, b1
        B[2 * t + 8, g], B[2 * t + 9, g] = b2, b3
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane][0] += D[g, 2 * t]
        acc[lane][1] += D[g, 2 * t + 1]
        acc[lane][2] += D[g + 8, 2 * t]
        acc[lane][3] += D[g + 8, 2 * t + 1]


def check_gemm_warp_tile():
    # One warp's 64x32 tile of gemm_mma_bf16 (warp_m = warp_n = 0), one BK=32 stage.
    BK = 32
    As = rng.standard_normal((64, BK))
    Ws = rng.standard_normal((32, BK))
    acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(4)] for _ in range(4)]
    for ks in (0, 16):
        a = [ldmatrix_x4(As, lambda lane, mi=mi: (mi * 16 + (lane & 15), ks + (lane >> 4) * 8)) for mi in range(4)]
        b = [None] * 4
        for nj in range(2):
            r = ldmatrix_x4(Ws, lambda lane, nj=nj: (nj * 16 + (lane & 7) + (lane >> 4) * 8, ks + ((lane >> 3) & 1) * 8))
            b[2 * nj] = [(r[l][0], r[l][1]) for l in range(32)]
            b[2 * nj + 1] = [(r[l][2], r[l][3]) for l in range(32)]
        for mi in range(4):
            for ni in range(4):
                mma(acc[mi][ni], a[mi], b[ni])
    C = np.zeros((64, 32))
    for mi in range(4):
        for ni in range(4):
            for lane in range(32):
                for e in range(4):
                    m = mi * 16 + (lane >> 2) + (8 if e >= 2 else 0)
                    n = ni * 8 + (lane & 3) * 2 + (e & 1)
                    C[m, n] = acc[mi][ni][lane][e]
    err = np.abs(C - As @ Ws.T).max()
    assert err < 1e-9, err
    print(f"gemm warp tile: max error {err:.1e}")


def check_flash_warp(D=32, nk=64, causal=True):
    # One warp (rows 0..15) of flash_attention<D>, one 64-key tile, log2-domain softmax.
    Q = rng.standard_normal((16, D))
    K = rng.standard_normal((nk, D))
    V = rng.standard_normal((nk, D))
    scale = 1 / np.sqrt(D)
    qf = [ldmatrix_x4(Q, lambda lane, kk=kk: ((lane & 15), kk * 16 + (lane >> 4) * 8)) for kk in range(D // 16)]
    s = [[[0.0] * 4 for _ in range(32)] for _ in range(8)]
    for kk in range(D // 16):
        for nb in range(4):
            r = ldmatrix_x4(K, lambda lane, nb=nb: (nb * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8))
            mma(s[2 * nb], qf[kk], [(r[l][0], r[l][1]) for l in range(32)])
            mma(s[2 * nb + 1], qf[kk], [(r[l][2], r[l][3]) for l in range(32)])
    # mask + softmax (exact, per row) in the fragment layout
    S = np.full((16, nk), -np.inf)
    for j in range(8):
        for lane in range(32):
            for e in range(4):
                row = (lane >> 2) + (8 if e >= 2 else 0)
                key = j * 8 + (lane & 3) * 2 + (e & 1)
                S[row, key] = s[j][lane][e] * scale if (not causal or key <= row + 20) else -np.inf
    P = np.exp(S - S.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    for j in range(8):
        for lane in range(32):
            for e in range(4):
                s[j][lane][e] = P[(lane >> 2) + (8 if e >= 2 else 0), j * 8 + (lane & 3) * 2 + (e & 1)]
    o = [[[0.0] * 4 for _ in range(32)] for _ in range(D // 8)]
    for kk in range(4):
        a = [((s[2 * kk][l][0], s[2 * kk][l][1]), (s[2 * kk][l][2], s[2 * kk][l][3]),
              (s[2 * kk + 1][l][0], s[2 * kk + 1][l][1]), (s[2 * kk + 1][l][2], s[2 * kk + 1][l][3])) for l in range(32)]
        for db in range(D // 16):
            r = ldmatrix_x4(V, lambda lane, kk=kk, db=db: (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, db * 16 + (lane >> 4) * 8), trans=True)
            mma(o[2 * db], a, [(r[l][0], r[l][1]) for l in range(32)])
            mma(o[2 * db + 1], a, [(r[l][2], r[l][3]) for l in range(32)])
    O = np.zeros((16, D))
    for i in range(D // 8):
        for lane in range(32):
            for e in range(4):
                O[(lane >> 2) + (8 if e >= 2 else 0), i * 8 + (lane & 3) * 2 + (e & 1)] = o[i][lane][e]
    err = np.abs(O - P @ V).max()
    assert err < 1e-9, err
    print(f"flash warp (D={D}): max error {err:.1e}")


if __name__ == "__main__":
    check_gemm_warp_tile()
    check_flash_warp(32)
    check_flash_warp(64, causal=False)
