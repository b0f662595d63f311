// 8-bit compute paths, v1: the exact arithmetic of the CPU emulations (src/backend/cpu/quantized.rs)
// on CUDA cores, as the correctness baseline the tensor-core versions will be checked against.
//   FP8 W8A8 linear: per-token e4m3 activations (|x|max -> 448), per-channel e4m3 weights.
//     v1 row_absmax_bf16 + gemm_w8a8_tiled_bf16: 16x16 tiles on CUDA cores, any shape.
//     v2 quantize_rows_e4m3_bf16 + gemm_w8a8_mma_e4m3: e4m3 codes per token, then mma.sync
//        m16n8k32 e4m3 with f32 accumulators (sm_89, sm_90, sm_120) on the 128x128 tile of
//        mma_tile.cuh; scales and bias in the epilogue. Needs K % 16 == 0.
//   Sage-style attention: K and V smoothed by their token means, int8 Q/K per 64-token block, fp8 P
//   (x448) and per-channel fp8 V, online softmax over 64-key tiles, f32 accumulation.
#include <cuda_fp8.h>

#include "common.cuh"
#include "mma_tile.cuh"

#define SAGE_BLOCK 64

__device__ __forceinline__ float fp8_round(float x) {
    __nv_fp8_e4m3 v(x);  // round to nearest even, saturating
    return (float)v;
}

__device__ __forceinline__ float int8_round(float x) { return fminf(fmaxf(rintf(x), -127.f), 127.f); }

// out[r] = max |x[r, :]| (one block per row).
extern "C" __global__ void row_absmax_bf16(const bf16* x, float* out, int cols) {
    __shared__ float scratch[32];
    i64 r = blockIdx.x;
    float m = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, fabsf(to_f(x[r * cols + i])));
    m = block_max(m, scratch);
    if (threadIdx.x == 0) out[r] = m;
}

#define T1 16
extern "C" __global__ void gemm_w8a8_tiled_bf16(const bf16* A, const float* a_absmax, const unsigned char* Wq,
                                                const float* w_scale, const bf16* bias, bf16* C, int M, int N, int K,
                                                i64 ldc) {
    __shared__ float As[T1][T1 + 1];
    __shared__ float Ws[T1][T1 + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    i64 m = (i64)blockIdx.y * T1 + ty, n = (i64)blockIdx.x * T1 + tx;
    i64 wn = (i64)blockIdx.x * T1 + ty;
    float sa = m < M ? a_absmax[m] / 448.f : 0.f;
    float inv = sa > 0.f ? 1.f / sa : 0.f;
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += T1) {
        As[ty][tx] = (m < M && k0 + tx < K) ? fp8_round(to_f(A[m * K + k0 + tx]) * inv) * sa : 0.f;
        if (wn < N && k0 + tx < K) {
            __nv_fp8_e4m3 v;
            v.__x = Wq[wn * K + k0 + tx];
            Ws[ty][tx] = (float)v * w_scale[wn];
        } else {
            Ws[ty][tx] = 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < T1; k++) acc += As[ty][k] * Ws[tx][k];
        __syncthreads();
    }
    if (m < M && n < N) C[m * ldc + n] = to_bf(acc + (bias ? to_f(bias[n]) : 0.f));
}

// Per (batch, kv head, channel): means of K and V over tokens, and |V - mean|max.
// K/V statistics for Sage smoothing as a parallel reduction over token chunks (was one block per
// (batch, kv head) scanning the sequence serially). Grid (token chunks of SAGE_STATS_TOKENS, batch * kv_heads),
// one thread per channel (strided); K and V [B, Nk, Hkv, D] with tokens `ld` elements apart (a slice of a
// fused projection read in place). Pass 1: f64 sums of K and V per channel into sums [bh][2][d] (zeroed
// by the launcher; with k null only V's, K's coming from sage_norm_rope_int8_bf16; bf16 values summed in f64
// are exact, so the order of the atomics does not matter in practice). Pass 2: the means (as the serial kernel: f64 sum / n, rounded to f32), written by chunk 0, and
// |v - v_mean|max per channel as atomicMax on the bits of a non-negative float (ordered as unsigned) into
// v_absmax (zeroed).
#define SAGE_STATS_TOKENS 256

extern "C" __global__ void sage_kv_sums_bf16(const bf16* k, const bf16* v, double* sums, int nk, int kv_heads, int d,
                                              i64 ld) {
    const int bh = blockIdx.y, b = bh / kv_heads, h = bh % kv_heads;
    const int j0 = blockIdx.x * SAGE_STATS_TOKENS, j1 = min(nk, j0 + SAGE_STATS_TOKENS);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        double sk = 0.0, sv = 0.0;
        for (int j = j0; j < j1; j++) {
            i64 at = ((i64)b * nk + j) * ld + (i64)h * d + c;
            if (k) sk += to_f(k[at]);
            sv += to_f(v[at]);
        }
        if (k) atomicAdd(&sums[(i64)bh * 2 * d + c], sk);
        atomicAdd(&sums[((i64)bh * 2 + 1) * d + c], sv);
    }
}

extern "C" __global__ void sage_kv_means_absmax_bf16(const bf16* v, const double* sums, float* k_mean, float* v_mean,
                                                     float* v_absmax, int nk, int kv_heads, int d, i64 ld) {
    const int bh = blockIdx.y, b = bh / kv_heads, h = bh % kv_heads;
    const int j0 = blockIdx.x * SAGE_STATS_TOKENS, j1 = min(nk, j0 + SAGE_STATS_TOKENS);
    const double n = nk > 0 ? (double)nk : 1.0;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const float vm = (float)(sums[((i64)bh * 2 + 1) * d + c] / n);
        if (blockIdx.x == 0) {
            k_mean[(i64)bh * d + c] = (float)(sums[(i64)bh * 2 * d + c] / n);
            v_mean[(i64)bh * d + c] = vm;
        }
        float mx = 0.f;
        for (int j = j0; j < j1; j++) mx = fmaxf(mx, fabsf(to_f(v[((i64)b * nk + j) * ld + (i64)h * d + c]) - vm));
        atomicMax(reinterpret_cast<unsigned*>(&v_absmax[(i64)bh * d + c]), __float_as_uint(mx));
    }
}

// Per 64-token block of (batch, head): |x - mean|max (mean may be null). Grid (blocks, batch*heads).
extern "C" __global__ void sage_block_absmax_bf16(const bf16* x, const float* mean, float* out, int n, int heads, int d) {
    __shared__ float scratch[32];
    int blk = blockIdx.x, bh = blockIdx.y;
    int b = bh / heads, h = bh % heads;
    float m = 0.f;
    int rows = min(SAGE_BLOCK, n - blk * SAGE_BLOCK);
    for (int i = threadIdx.x; i < rows * d; i += blockDim.x) {
        int j = blk * SAGE_BLOCK + i / d, c = i % d;
        float val = to_f(x[(((i64)b * n + j) * heads + h) * d + c]) - (mean ? mean[(i64)bh * d + c] : 0.f);
        m = fmaxf(m, fabsf(val));
    }
    m = block_max(m, scratch);
    if (threadIdx.x == 0) out[(i64)bh * gridDim.x + blk] = m;
}

// One warp per query row; d <= 32 * MAXV.
extern "C" __global__ void attention_sage_rowwise_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int batch,
                                                       int nq, int nk, int heads, int kv_heads, int d, float scale,
                                                       int causal, const int* valid_len, const float* q_absmax,
                                                       const float* k_absmax, const float* k_mean, const float* v_mean,
                                                       const float* v_absmax) {
    const int MAXV = 8;
    i64 warp_id = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp_id >= (i64)batch * nq * heads) return;
    int h = (int)(warp_id % heads);
    i64 qi = (warp_id / heads) % nq;
    int b = (int)(warp_id / ((i64)heads * nq));
    int hk = h / (heads / kv_heads);
    i64 kvh = (i64)b * kv_heads + hk;
    int q_blocks = (nq + SAGE_BLOCK - 1) / SAGE_BLOCK, k_blocks = (nk + SAGE_BLOCK - 1) / SAGE_BLOCK;
    float sq = q_absmax[((i64)b * heads + h) * q_blocks + qi / SAGE_BLOCK] / 127.f;
    float inv_q = sq > 0.f ? 1.f / sq : 0.f;
    int nv = (d + 31) / 32;
    float qr[MAXV], acc[MAXV], mean[MAXV], vs[MAXV], inv_v[MAXV], vmean[MAXV];
    for (int i = 0; i < nv; i++) {
        int c = lane + 32 * i;
        qr[i] = c < d ? int8_round(to_f(q[warp_id * d + c]) * inv_q) : 0.f;
        mean[i] = c < d ? k_mean[kvh * d + c] : 0.f;
        vs[i] = c < d ? v_absmax[kvh * d + c] / 448.f : 0.f;
        inv_v[i] = vs[i] > 0.f ? 1.f / vs[i] : 0.f;
        vmean[i] = c < d ? v_mean[kvh * d + c] : 0.f;
        acc[i] = 0.f;
    }
    i64 valid = valid_len ? valid_len[b] : nk;
    i64 kend = causal ? min(qi + 1, valid) : (i64)nk;
    float m = NEG_INFINITY_F, l = 0.f;
    for (i64 t0 = 0; t0 < kend; t0 += SAGE_BLOCK) {
        int tn = (int)min((i64)SAGE_BLOCK, kend - t0);
        float sk = k_absmax[kvh * k_blocks + t0 / SAGE_BLOCK] / 127.f;
        float inv_k = sk > 0.f ? 1.f / sk : 0.f;
        float s[SAGE_BLOCK];
        float tmax = m;
        for (int jj = 0; jj < tn; jj++) {
            const bf16* kr = k + (((i64)b * nk + t0 + jj) * kv_heads + hk) * d;
            float dot = 0.f;  // exact: int8 products summed in f32 stay integers below 2^24
            for (int i = 0; i < nv; i++) {
                int c = lane + 32 * i;
                if (c < d) dot += qr[i] * int8_round((to_f(kr[c]) - mean[i]) * inv_k);
            }
            s[jj] = warp_sum(dot) * (sq * sk) * scale;
            tmax = fmaxf(tmax, s[jj]);
        }
        float alpha = m == NEG_INFINITY_F ? 0.f : expf(m - tmax);
        l *= alpha;
        for (int i = 0; i < nv; i++) acc[i] *= alpha;
        for (int jj = 0; jj < tn; jj++) {
            float p = expf(s[jj] - tmax);
            l += p;
            float pq = fp8_round(p * 448.f);
            const bf16* vr = v + (((i64)b * nk + t0 + jj) * kv_heads + hk) * d;
            for (int i = 0; i < nv; i++) {
                int c = lane + 32 * i;
                if (c < d) acc[i] += pq * fp8_round((to_f(vr[c]) - vmean[i]) * inv_v[i]);
            }
        }
        m = tmax;
    }
    for (int i = 0; i < nv; i++) {
        int c = lane + 32 * i;
        if (c < d) out[warp_id * d + c] = to_bf(l > 0.f ? acc[i] * vs[i] / 448.f / l + vmean[i] : 0.f);
    }
}

// One row of v2's activations from its values value(0..cols) (computed twice, never stored): scale =
// |value|max / 448 into *q_scale and the e4m3 codes of value / scale into q. The whole block works
// on the row; `scratch` is the block reduction's 32 floats of shared memory.
template <class Value>
__device__ __forceinline__ void quantize_row_e4m3(Value value, int cols, unsigned char* q, float* q_scale,
                                                  float* scratch) {
    float m = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, fabsf(value(i)));
    m = block_max(m, scratch);
    const float sc = m / 448.f, inv = sc > 0.f ? 1.f / sc : 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        __nv_fp8_e4m3 c(value(i) * inv);
        q[i] = c.__x;
    }
    if (threadIdx.x == 0) *q_scale = sc;
}

// adaLN + the FP8 linear's activation quantization in one pass (the producer of v2's activations):
// per row of x [rows, K], the layer_norm_bf16 + modulate value rounded to bf16 as that kernel stores
// it, then scale = |value|max / 448 and the e4m3 codes of value / scale, as quantize_rows_e4m3_bf16
// computes them from the stored activation. The bf16 activation itself is never written.
extern "C" __global__ void layer_norm_modulate_e4m3_bf16(const bf16* x, const bf16* shift, const bf16* scale,
                                                         i64 shift_s, i64 scale_s, i64 rows_per_sample, float eps,
                                                         unsigned char* q, float* q_scale, int cols) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x, b = row / rows_per_sample;
    const bf16* xr = x + row * cols;
    float mean;
    const float inv = block_mean_rstd(xr, cols, eps, scratch, mean);
    auto value = [&](int i) {
        float n = (to_f(xr[i]) - mean) * inv;
        return to_f(to_bf(n * (1.f + to_f(scale[b * scale_s + i])) + to_f(shift[b * shift_s + i])));
    };
    quantize_row_e4m3(value, cols, q + row * cols, q_scale + row, scratch);
}

// SwiGLU (beside a prefix, p may be 0) + the FP8 linear's activation quantization in one pass (the
// producer of v2's activations for the feed-forward's output projection): per row, the values of
// [prefix | silu(gate) · value] rounded to bf16 as swiglu_concat_bf16x8 / swiglu_bf16x8 store them,
// then scale = |row|max / 448 and the e4m3 codes, as quantize_rows_e4m3_bf16 computes them from the
// stored activation. prefix [rows, p] dense; x rows `ld` apart, gate then value (m each). The bf16
// activation itself is never written.
extern "C" __global__ void swiglu_concat_e4m3_bf16(const bf16* prefix, int p, const bf16* x, i64 ld, int m,
                                                   unsigned char* q, float* q_scale) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const int cols = p + m;
    const bf16* xr = x + row * ld;
    auto value = [&](int i) {
        if (i < p) return to_f(prefix[row * p + i]);
        return to_f(to_bf(silu_f(to_f(xr[i - p])) * to_f(xr[i - p + m])));
    };
    quantize_row_e4m3(value, cols, q + row * cols, q_scale + row, scratch);
}

// Per row of x [rows, K]: scale = |x|max / 448 and the e4m3 codes of x / scale (v2's activations).
extern "C" __global__ void quantize_rows_e4m3_bf16(const bf16* x, unsigned char* q, float* scale, int cols) {
    __shared__ float scratch[32];
    const i64 r = blockIdx.x;
    const bf16* xr = x + r * cols;
    quantize_row_e4m3([&](int i) { return to_f(xr[i]); }, cols, q + r * cols, scale + r, scratch);
}

#if __CUDA_ARCH__ >= 890
// One 128x128 tile of (Aq · Wqᵀ) · a_scale[m] · w_scale[n] + bias[n] (Aq [M, K] and Wq [N, K] e4m3
// codes, 64 of K per stage on the tile of mma_tile.cuh), its bf16 rows handed to store8.
template <typename Store8>
__device__ __forceinline__ void w8a8_mma_tile(MmaTileSmem& smem, const unsigned char* __restrict__ A,
                                              const float* __restrict__ a_scale, const unsigned char* __restrict__ W,
                                              const float* __restrict__ w_scale, const bf16* __restrict__ bias, int M,
                                              int N, int K, Store8 store8) {
    const i64 m0 = (i64)blockIdx.y * TILE_M, n0 = (i64)blockIdx.x * TILE_N;
    float acc[4][4][4];
    mma_tile_128x128<mma_e4m3_16832>(smem, A, W, M, N, K, m0, n0, acc);
    mma_tile_store8(
        smem, acc, m0, n0, M, N,
        [&](i64 m, i64 n, float v) { return v * a_scale[m] * w_scale[n] + (bias ? to_f(bias[n]) : 0.f); }, store8);
}
#endif

// C = (Aq · Wqᵀ) · a_scale[m] · w_scale[n] + bias[n], C rows `ldc` apart.
extern "C" __global__ void __launch_bounds__(256)
    gemm_w8a8_mma_e4m3(const unsigned char* __restrict__ A, const float* __restrict__ a_scale,
                       const unsigned char* __restrict__ W, const float* __restrict__ w_scale,
                       const bf16* __restrict__ bias, bf16* __restrict__ C, int M, int N, int K, i64 ldc) {
#if __CUDA_ARCH__ >= 890
    __shared__ __align__(16) MmaTileSmem smem;
    w8a8_mma_tile(smem, A, a_scale, W, w_scale, bias, M, N, K,
                  [&](i64 m, i64 n, uint4 y, int count) { store_bf16_upto8(C + m * ldc + n, y, count); });
#else
    __trap();  // e4m3 tensor cores need sm_89 or newer: the launcher picks v1 for these images
#endif
}

// gemm_w8a8_mma_e4m3 with the DiT's gated residual in the epilogue (gemm_mma_gated_bf16's
// contract): C = X + gate[m / L] · y, y the FP8 linear's output rounded to bf16 as it would be
// stored. X and C dense [M, N], gate rows `gs` apart.
extern "C" __global__ void __launch_bounds__(256)
    gemm_w8a8_mma_gated_e4m3(const unsigned char* __restrict__ A, const float* __restrict__ a_scale,
                             const unsigned char* __restrict__ W, const float* __restrict__ w_scale,
                             const bf16* __restrict__ bias, const bf16* __restrict__ X, const bf16* __restrict__ gate,
                             i64 gs, int L, bf16* __restrict__ C, int M, int N, int K) {
#if __CUDA_ARCH__ >= 890
    __shared__ __align__(16) MmaTileSmem smem;
    w8a8_mma_tile(smem, A, a_scale, W, w_scale, bias, M, N, K,
                  [&](i64 m, i64 n, uint4 y, int count) { gated_store8(X, gate, gs, L, C, N, m, n, y, count); });
#else
    __trap();  // e4m3 tensor cores need sm_89 or newer: the launcher picks the composition there
#endif
}
