// The QK norm's row arithmetic, shared by the kernels that apply it (rms_norm_rope_bf16 in norm.cu,
// sage_norm_rope_int8_bf16 in attention_sage_mma.cu) so they round identically: one warp per row of d.
#pragma once
#include "common.cuh"

// 1 / RMS of a d-element row, the squares summed lane-strided by one warp.
__device__ __forceinline__ float qk_rms_inverse(const bf16* xr, int d, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x & 31; i < d; i += 32) {
        float v = to_f(xr[i]);
        ss += v * v;
    }
    return rsqrtf(warp_sum(ss) / d + eps);
}

// Element i of the normed row (times the weight, if any), rounded to bf16 as rms_norm_bf16 stores it.
__device__ __forceinline__ float qk_normed(const bf16* xr, const bf16* w, float inv, int i) {
    float n = to_f(xr[i]) * inv;
    return to_f(to_bf(w ? n * to_f(w[i]) : n));
}

// The elements RoPE pair p rotates: (2p, 2p + 1) interleaved (FLUX), (p, p + d/2) otherwise (Qwen).
__device__ __forceinline__ void rope_pair(int p, int half, int interleaved, int& i0, int& i1) {
    i0 = interleaved ? 2 * p : p;
    i1 = interleaved ? 2 * p + 1 : p + half;
}
