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

// Scales the scores to the log2 domain; in a `partial` tile (some key hidden from some row) the keys for which
// visible(key, e) is false become ATTN_NEG_INF. Score s[j][e] is key k0 + 8j + 2(lane % 4) + (e & 1).
template <int NT, typename Visible>
__device__ __forceinline__ void scale_scores(float (&s)[NT][4], float scale_log2, bool partial, int k0, Visible visible) {
    const int lane = threadIdx.x & 31;
    if (partial) {
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + j * 8 + (lane & 3) * 2 + (e & 1);
                s[j][e] = visible(key, e) ? s[j][e] * scale_log2 : ATTN_NEG_INF;
            }
    } else {
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] *= scale_log2;
    }
}

// Rescales the rows of an accumulator tile in the same layout (o[i][0..1]: row lane/4, o[i][2..3]: row lane/4 + 8).
template <int N>
__device__ __forceinline__ void rescale_rows(float (&o)[N][4], const float alpha[2]) {
#pragma unroll
    for (int i = 0; i < N; i++) {
        o[i][0] *= alpha[0];
        o[i][1] *= alpha[0];
        o[i][2] *= alpha[1];
        o[i][3] *= alpha[1];
    }
}

// Writes this thread's two rows (row0 and row0 + 8, those below nq) of the normalised output tile o / l as bf16
// pairs: ob points at column 2(lane % 4) of row 0, rows `stride` elements apart. row_max: the |max| of the bf16
// values this thread stored in each row (0 for a row not stored), for e4m3_rows.cuh.
template <int N>
__device__ __forceinline__ void store_rows_bf16(const float (&o)[N][4], const float inv[2], bf16* ob, int row0, int nq,
                                                i64 stride, float row_max[2]) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = row0 + r * 8;
        row_max[r] = 0.f;
        if (row < nq) {
#pragma unroll
            for (int i = 0; i < N; i++) {
                const unsigned packed = pack_bf16x2(o[i][2 * r] * inv[r], o[i][2 * r + 1] * inv[r]);
                *reinterpret_cast<unsigned*>(ob + (i64)row * stride + i * 8) = packed;
                row_max[r] = fmaxf(row_max[r], bf16x2_absmax(packed));
            }
        }
    }
}

// The same without the maxima (kept apart: deriving it from the above moved ptxas's register allocation,
// and spills, in flash v3 at d 128).
template <int N>
__device__ __forceinline__ void store_rows_bf16(const float (&o)[N][4], const float inv[2], bf16* ob, int row0, int nq,
                                                i64 stride) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = row0 + r * 8;
        if (row < nq) {
#pragma unroll
            for (int i = 0; i < N; i++)
                *reinterpret_cast<unsigned*>(ob + (i64)row * stride + i * 8) = pack_bf16x2(o[i][2 * r] * inv[r], o[i][2 * r + 1] * inv[r]);
        }
    }
}

// 1 / (row sum over the quad), 0 for a row that saw no key.
__device__ __forceinline__ float row_inverse(float l) {
    l += __shfl_xor_sync(FULL_MASK, l, 1);
    l += __shfl_xor_sync(FULL_MASK, l, 2);
    return l > 0.f ? 1.f / l : 0.f;
}
