// Scaled dot-product attention, q [B, Nq, H, D], k/v [B, Nk, Hkv, D] (GQA: kv head h / (H/Hkv)),
// out [B, Nq, H, D]. Masks: causal (key j <= query i) and right padding (j < valid_len[b]).
//   v1 attention_rowwise_bf16: one warp per query row, online softmax, any D <= 1024.
//   v2 flash_attention_d{64,128}_bf16: FlashAttention-2 style, tensor cores (mma.sync), 64-query
//      blocks (4 warps x 16 rows), 64-key tiles, softmax in f32 with exp2.
#include "common.cuh"

#define NEG_INF (-1e30f)

__device__ __forceinline__ bool key_visible(i64 q, i64 k, i64 nk, int causal, i64 valid) {
    return k < nk && k < valid && (!causal || k <= q);
}

extern "C" __global__ void attention_rowwise_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int batch, int nq,
                                                  int nk, int heads, int kv_heads, int d, float scale, int causal,
                                                  const int* valid_len) {
    const int MAXV = 32;  // d <= 32 * MAXV
    i64 warp_id = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    i64 rows = (i64)batch * nq * heads;
    if (warp_id >= rows) return;
    int h = (int)(warp_id % heads);
    i64 qi = (warp_id / heads) % nq;
    int b = (int)(warp_id / ((i64)heads * nq));
    int hk = h / (heads / kv_heads);
    i64 valid = valid_len ? valid_len[b] : nk;
    int nv = (d + 31) / 32;
    float qr[MAXV], acc[MAXV];
    const bf16* qrow = q + warp_id * d;
    for (int i = 0; i < nv; i++) {
        int dd = lane + 32 * i;
        qr[i] = dd < d ? to_f(qrow[dd]) : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    i64 kend = causal ? min((i64)nk, qi + 1) : (i64)nk;
    kend = min(kend, valid);
    for (i64 j = 0; j < kend; j++) {
        const bf16* krow = k + (((i64)b * nk + j) * kv_heads + hk) * d;
        float s = 0.f;
        for (int i = 0; i < nv; i++) {
            int dd = lane + 32 * i;
            if (dd < d) s += qr[i] * to_f(krow[dd]);
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float alpha = __expf(m - mn), p = __expf(s - mn);
        l = l * alpha + p;
        const bf16* vrow = v + (((i64)b * nk + j) * kv_heads + hk) * d;
        for (int i = 0; i < nv; i++) {
            int dd = lane + 32 * i;
            if (dd < d) acc[i] = acc[i] * alpha + p * to_f(vrow[dd]);
        }
        m = mn;
    }
    float inv = l > 0.f ? 1.f / l : 0.f;
    for (int i = 0; i < nv; i++) {
        int dd = lane + 32 * i;
        if (dd < d) out[warp_id * d + dd] = to_bf(acc[i] * inv);
    }
}

template <int D>
__device__ __forceinline__ void flash_attention(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                const bf16* __restrict__ v, bf16* __restrict__ out, int nq, int nk, int heads,
                                                int kv_heads, float scale_log2, int causal, const int* valid_len) {
    constexpr int BQ = 64, BKV = 64, LD = D + 8;
    bf16* Qs = dynamic_smem<bf16>();
    bf16* Ks = Qs + BQ * LD;
    bf16* Vs = Ks + BKV * LD;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = blockIdx.y, b = blockIdx.z, hk = h / (heads / kv_heads);
    const i64 q0 = (i64)blockIdx.x * BQ;
    const i64 q_stride = (i64)heads * D, kv_stride = (i64)kv_heads * D;
    const bf16* qb = q + ((i64)b * nq) * q_stride + (i64)h * D;
    const bf16* kb = k + ((i64)b * nk) * kv_stride + (i64)hk * D;
    const bf16* vb = v + ((i64)b * nk) * kv_stride + (i64)hk * D;
    const i64 valid = valid_len ? (i64)valid_len[b] : (i64)nk;

    // Q tile -> smem -> registers (A fragments for each 16-wide slice of D).
    for (int c = tid; c < BQ * D / 8; c += 128) {
        int row = c / (D / 8), col = (c % (D / 8)) * 8;
        bool ok = q0 + row < nq;
        cp_async16(&Qs[row * LD + col], ok ? (const void*)(qb + (q0 + row) * q_stride + col) : (const void*)q, ok ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        ldmatrix_x4(qf[kk], &Qs[(warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8]);

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {NEG_INF, NEG_INF}, l_r[2] = {0.f, 0.f};
    const i64 row_q[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};

    i64 kend = min((i64)nk, valid);
    if (causal) kend = min(kend, q0 + BQ);
    for (i64 k0 = 0; k0 < kend; k0 += BKV) {
        __syncthreads();
        for (int c = tid; c < BKV * D / 8; c += 128) {
            int row = c / (D / 8), col = (c % (D / 8)) * 8;
            bool ok = k0 + row < nk;
            cp_async16(&Ks[row * LD + col], ok ? (const void*)(kb + (k0 + row) * kv_stride + col) : (const void*)k, ok ? 16 : 0);
            cp_async16(&Vs[row * LD + col], ok ? (const void*)(vb + (k0 + row) * kv_stride + col) : (const void*)v, ok ? 16 : 0);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        // S = Q Kᵀ for this warp's 16 rows x 64 keys (8 tiles of 16x8).
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int nb = 0; nb < 4; nb++) {
                unsigned r[4];
                ldmatrix_x4(r, &Ks[(nb * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8]);
                mma_bf16_16816(s[2 * nb], qf[kk], r[0], r[1]);
                mma_bf16_16816(s[2 * nb + 1], qf[kk], r[2], r[3]);
            }

        // Mask, scale (log2 domain), online softmax per row (2 rows per thread, quad-reduced).
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                i64 key = k0 + j * 8 + (lane & 3) * 2 + (e & 1);
                bool ok = key_visible(row_q[e >> 1], key, nk, causal, valid);
                s[j][e] = ok ? s[j][e] * scale_log2 : NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
            float mn = fmaxf(m_r[r], mx[r]);
            // Rows with nothing visible yet keep a neutral reference so exp2 stays finite.
            float ref = mn <= NEG_INF ? 0.f : mn;
            alpha[r] = exp2f(m_r[r] - ref);
            m_r[r] = mn;
            mx[r] = ref;
        }
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = s[j][e] <= NEG_INF ? 0.f : exp2f(s[j][e] - mx[e >> 1]);
                s[j][e] = p;
                rs[e >> 1] += p;
            }
        l_r[0] = l_r[0] * alpha[0] + rs[0];
        l_r[1] = l_r[1] * alpha[1] + rs[1];
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= alpha[0];
            o[i][1] *= alpha[0];
            o[i][2] *= alpha[1];
            o[i][3] *= alpha[1];
        }

        // O += P V: P's accumulator layout is the A-fragment layout of the next mma.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned a[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                             pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int db = 0; db < D / 16; db++) {
                unsigned r[4];
                ldmatrix_x4_trans(r, &Vs[(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + db * 16 + (lane >> 4) * 8]);
                mma_bf16_16816(o[2 * db], a, r[0], r[1]);
                mma_bf16_16816(o[2 * db + 1], a, r[2], r[3]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        l_r[r] += __shfl_xor_sync(FULL_MASK, l_r[r], 1);
        l_r[r] += __shfl_xor_sync(FULL_MASK, l_r[r], 2);
        l_r[r] = l_r[r] > 0.f ? 1.f / l_r[r] : 0.f;
    }
    bf16* ob = out + ((i64)b * nq) * q_stride + (i64)h * D;
#pragma unroll
    for (int i = 0; i < D / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            i64 row = row_q[e >> 1];
            int col = i * 8 + (lane & 3) * 2 + (e & 1);
            if (row < nq) ob[row * q_stride + col] = to_bf(o[i][e] * l_r[e >> 1]);
        }
}

extern "C" __global__ void __launch_bounds__(128)
    flash_attention_d64_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk, int heads,
                             int kv_heads, float scale_log2, int causal, const int* valid_len) {
    flash_attention<64>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len);
}

extern "C" __global__ void __launch_bounds__(128)
    flash_attention_d128_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk, int heads,
                              int kv_heads, float scale_log2, int causal, const int* valid_len) {
    flash_attention<128>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len);
}
