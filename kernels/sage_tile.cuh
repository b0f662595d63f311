// The per-tile arithmetic of the tensor-core Sage kernels (attention_sage_mma.cu on mma.sync,
// attention_sage_wgmma.cu on wgmma), written once so both keep the CPU emulation's numerics
// (src/backend/cpu/quantized.rs): exact integer scores times the Q and K block scales, online
// softmax in f32 (exp2 of the scores in the log2 domain: the natural exp up to rounding), P scaled
// by 448 and rounded to e4m3, P·V accumulated in f32, the output unscaled by V's per-channel scale
// and V's mean added back. Tiles are in the m16n8 accumulator layout (softmax_tile.cuh): s[j][e] is
// row lane/4 (+8 for e >= 2), key j*8 + 2*(lane%4) + (e & 1); a wgmma accumulator is that layout
// per warp.
#pragma once
#include "common.cuh"
#include "e4m3_rows.cuh"

// (float)x, exact for |x| < 2^22 (the scores: |x| <= 127² · 128 < 2^21), without I2F, which issues at a
// quarter of the FP32 rate or less: 1.5 · 2^23 + x holds x in its mantissa, and subtracting 1.5 · 2^23
// back is exact. One integer add and one float add per score.
__device__ __forceinline__ float sage_score_float(int x) { return __int_as_float(0x4B400000 + x) - 12582912.f; }

// One tile's integer scores si to P (in s, times 448), updating the running max m_r and this
// thread's partial row sums l_r; alpha returns the factor the output rows must be rescaled by.
// factor = Q block scale x K block scale; keys with visible(key, e) false are hidden. The softmax
// runs in the log2 domain (scores times log2 e, then exp2: one MUFU op and no range reduction, where
// expf costs a handful of FP32 instructions more per score, the pipe that bounds these kernels);
// the CPU emulation's exp(s - m) is the same value up to f32 rounding. m_r is kept in that domain.
template <int NT, typename Visible>
__device__ __forceinline__ void sage_softmax_tile(const int (&si)[NT][4], float (&s)[NT][4], float factor, float scale,
                                                  int k0, float m_r[2], float l_r[2], float alpha[2], Visible visible) {
    const int lane = threadIdx.x & 31;
    const float to_log2 = factor * scale * 1.4426950408889634f;
    float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = k0 + j * 8 + (lane & 3) * 2 + (e & 1);
            s[j][e] = visible(key, e) ? sage_score_float(si[j][e]) * to_log2 : NEG_INFINITY_F;
            mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
        }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
        alpha[r] = m_r[r] == NEG_INFINITY_F ? 0.f : exp2f(m_r[r] - mx[r]);
        m_r[r] = mx[r];
        l_r[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float p = s[j][e] == NEG_INFINITY_F ? 0.f : exp2f(s[j][e] - mx[e >> 1]);
            l_r[e >> 1] += p;
            s[j][e] = p * 448.f;
        }
}

// The e4m3 A fragment (16 rows x 32 key slots, mma m16n8k32's layout) of keys 32*kk.. from P. The
// accumulators hold keys 2c, 2c+1 of each 8-key tile in thread c of a quad, the fragment wants 4
// consecutive slots: Vᵀ's keys are permuted to match (sage_quantize_vt_e4m3_bf16).
template <int NT>
__device__ __forceinline__ void sage_p_fragment_e4m3(const float (&s)[NT][4], int kk, unsigned a[4]) {
    const float* p0 = s[4 * kk];
    const float* p1 = s[4 * kk + 1];
    const float* p2 = s[4 * kk + 2];
    const float* p3 = s[4 * kk + 3];
    a[0] = pack_e4m3x4(p0[0], p0[1], p1[0], p1[1]);
    a[1] = pack_e4m3x4(p0[2], p0[3], p1[2], p1[3]);
    a[2] = pack_e4m3x4(p2[0], p2[1], p3[0], p3[1]);
    a[3] = pack_e4m3x4(p2[2], p2[3], p3[2], p3[3]);
}

// Writes this thread's two rows (row0, row0 + 8; those below nq) of the output: o scaled back by
// V's channel scale (v_absmax / 448) and P's 448, divided by the row sum, plus V's channel mean.
// ob points at row 0 of this head; v_mean and v_absmax at this (batch, kv head)'s channels.
// row_max: the |max| of the bf16 values this thread stored in each row (0 for rows not stored).
template <int N>
__device__ __forceinline__ void sage_store_rows(const float (&o)[N][4], const float l_r[2], const float* v_mean,
                                                const float* v_absmax, bf16* ob, int row0, int nq, i64 stride,
                                                float row_max[2]) {
    const int lane = threadIdx.x & 31;
    float l[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] = l_r[r] + __shfl_xor_sync(FULL_MASK, l_r[r], 1);
        l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
    }
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = row0 + half * 8;
        row_max[half] = 0.f;
        if (row >= nq) continue;
#pragma unroll
        for (int i = 0; i < N; i++) {
            const int c = i * 8 + (lane & 3) * 2;
            float r2[2];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const float vs = v_absmax[c + u] / 448.f;
                r2[u] = l[half] > 0.f ? o[i][2 * half + u] * vs / 448.f / l[half] + v_mean[c + u] : 0.f;
            }
            const unsigned packed = pack_bf16x2(r2[0], r2[1]);
            *reinterpret_cast<unsigned*>(ob + (i64)row * stride + c) = packed;
            row_max[half] = fmaxf(row_max[half], bf16x2_absmax(packed));
        }
    }
}
