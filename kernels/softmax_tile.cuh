// The online-softmax step of the tensor-core attention kernels (attention_v3.cu, attention_wide.cu) on one
// warp's 16-row score tile, held in the m16n8 accumulator layout: s[j][e] is row lane/4 (+8 for e >= 2),
// key j*8 + 2*(lane%4) + (e & 1). Scores come in already scaled to the log2 domain, hidden keys as
// ATTN_NEG_INF; P is then packed straight into the A fragments of the P·V mma (same layout, no shuffles).
#pragma once
#include "common.cuh"

#define ATTN_NEG_INF (-1e30f)

// Replaces s by p = exp2(s - m_new) (0 for hidden keys), updates the running max m_r and this thread's
// partial row sums l_r (the quad is summed once at the end), and returns in alpha the factor the output
// accumulator must be rescaled by.
template <int NT>
__device__ __forceinline__ void online_softmax_tile(float (&s)[NT][4], float m_r[2], float l_r[2], float alpha[2]) {
    float mx[2] = {ATTN_NEG_INF, ATTN_NEG_INF};
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
        float mn = fmaxf(m_r[r], mx[r]);
        // Rows with nothing visible yet keep a neutral reference so exp2 stays finite.
        float ref = mn <= ATTN_NEG_INF ? 0.f : mn;
        alpha[r] = exp2f(m_r[r] - ref);
        m_r[r] = mn;
        mx[r] = ref;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = s[j][e] <= ATTN_NEG_INF ? 0.f : exp2f(s[j][e] - mx[e >> 1]);
            s[j][e] = p;
            rs[e >> 1] += p;
        }
    l_r[0] = l_r[0] * alpha[0] + rs[0];
    l_r[1] = l_r[1] * alpha[1] + rs[1];
}

// The A fragment (16 rows x 16 keys, bf16) of keys 16*kk.. from the p tile.
template <int NT>
__device__ __forceinline__ void p_fragment(const float (&s)[NT][4], int kk, unsigned a[4]) {
    a[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// 1 / (row sum over the quad), 0 for a row that saw no key.
__device__ __forceinline__ float row_inverse(float l) {
    l += __shfl_xor_sync(FULL_MASK, l, 1);
    l += __shfl_xor_sync(FULL_MASK, l, 2);
    return l > 0.f ? 1.f / l : 0.f;
}
