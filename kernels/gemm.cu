// Matrix products C = A · Wᵀ (+ bias): A [M, K] row-major, W [N, K] row-major (PyTorch Linear
// weights), C [M, N] with leading dimension ldc. bf16 in, f32 accumulate, bf16 out.
//   v1 gemm_tiled_bf16: smem-tiled FMA, any shape and alignment (the correctness baseline).
//   v2 gemm_mma_bf16:   tensor cores (mma.sync m16n8k16 + ldmatrix), the 128x128 tile of
//                       mma_tile.cuh (32 bf16 of K per stage); needs K % 8 == 0 and 16-byte aligned rows.
//   v3 gemm_wgmma_bf16 (gemm_wgmma.cu): wgmma + TMA on sm_90a.
// Weight-only quantized W: v1 gemm_wq_tiled_bf16 (CUDA cores, any shape), v2 gemm_wq_mma_bf16.
// bias_mode: 0 none, 1 per column (bias[n], Linear), 2 per row (bias[m], conv as W · colᵀ).
#include <cuda_fp8.h>

#include "common.cuh"
#include "ggml_blocks.cuh"
#include "mma_tile.cuh"

#define T1 16
extern "C" __global__ void gemm_tiled_bf16(const bf16* A, const bf16* W, const bf16* bias, int bias_mode, bf16* C, int M,
                                           int N, int K, i64 ldc) {
    __shared__ float As[T1][T1 + 1];
    __shared__ float Ws[T1][T1 + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    i64 m = (i64)blockIdx.y * T1 + ty, n = (i64)blockIdx.x * T1 + tx;
    i64 wn = (i64)blockIdx.x * T1 + ty;  // W row this thread loads
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += T1) {
        As[ty][tx] = (m < M && k0 + tx < K) ? to_f(A[m * K + k0 + tx]) : 0.f;
        Ws[ty][tx] = (wn < N && k0 + tx < K) ? to_f(W[wn * K + k0 + tx]) : 0.f;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < T1; k++) acc += As[ty][k] * Ws[tx][k];
        __syncthreads();
    }
    if (m < M && n < N) C[m * ldc + n] = to_bf(acc + bias_at(bias, bias_mode, m, n));
}

// Weight-only quantized W (fmt 0 int8 per-row scale, 1 int4 per (row, group) scale with two codes
// per byte, low nibble first, 2 fp8 e4m3 per-row scale, 16 + t GGUF's block type t with its scales
// inside the blocks): dequantized while staging tiles.
__device__ __forceinline__ float dequant(const unsigned char* q, const float* s, int fmt, int group, i64 n, int k, int K) {
    if (fmt >= 16) return ggml_at(q, fmt - 16, n, k, K);
    if (fmt == 0) return (float)(signed char)q[n * K + k] * s[n];
    if (fmt == 1) {
        unsigned char b = q[(n * K + k) >> 1];
        int nib = (k & 1) ? (b >> 4) : (b & 15);
        return (float)(nib >= 8 ? nib - 16 : nib) * s[n * (K / group) + k / group];
    }
    __nv_fp8_e4m3 v;
    v.__x = q[n * K + k];
    return (float)v * s[n];
}

extern "C" __global__ void gemm_wq_tiled_bf16(const bf16* A, const unsigned char* Wq, const float* scales, int fmt, int group,
                                              const bf16* bias, int bias_mode, bf16* C, int M, int N, int K, i64 ldc) {
    __shared__ float As[T1][T1 + 1];
    __shared__ float Ws[T1][T1 + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    i64 m = (i64)blockIdx.y * T1 + ty, n = (i64)blockIdx.x * T1 + tx;
    i64 wn = (i64)blockIdx.x * T1 + ty;
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += T1) {
        As[ty][tx] = (m < M && k0 + tx < K) ? to_f(A[m * K + k0 + tx]) : 0.f;
        Ws[ty][tx] = (wn < N && k0 + tx < K) ? dequant(Wq, scales, fmt, group, wn, k0 + tx, K) : 0.f;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < T1; k++) acc += As[ty][k] * Ws[tx][k];
        __syncthreads();
    }
    if (m < M && n < N) C[m * ldc + n] = to_bf(acc + bias_at(bias, bias_mode, m, n));
}

// Weight-only quantized W on tensor cores (v2 of gemm_wq_tiled_bf16): A streams through the
// 128x128 tile's cp.async stages; each thread stages 16 consecutive weights of one W row per
// 32-element k tile, dequantized to bf16 in registers. The codes of tile k+1 are loaded before
// the mma loop of tile k and converted after it, so their latency hides behind the tensor cores
// (int8, fp8: 16 bytes; int4: 8 bytes and the group's scale). GGUF blocks are decoded element by
// element (ggml_at) before the loop. Needs K % 16 == 0, 16-byte aligned A and codes, and for int4
// a group that is a multiple of 16; the weights are rounded to bf16 before the mma (v1 keeps f32).
struct WqFetch {
    unsigned word[8];  // int8/fp8: 16 codes in word[0..3]; int4: 16 nibbles in word[0..1]; GGUF: bf16 pairs
    float scale;
};

__device__ __forceinline__ void wq_fetch(WqFetch& f, const unsigned char* __restrict__ q, const float* __restrict__ s,
                                         int fmt, int group, i64 n, int k, int N, int K) {
    if (n >= N) {
#pragma unroll
        for (int j = 0; j < 8; j++) f.word[j] = 0;
        f.scale = 0.f;
        return;
    }
    if (fmt == 0 || fmt == 2) {
        uint4 v = *reinterpret_cast<const uint4*>(q + n * K + k);
        f.word[0] = v.x, f.word[1] = v.y, f.word[2] = v.z, f.word[3] = v.w;
        f.scale = s[n];
    } else if (fmt == 1) {
        uint2 v = *reinterpret_cast<const uint2*>(q + ((n * K + k) >> 1));
        f.word[0] = v.x, f.word[1] = v.y;
        f.scale = s[n * (K / group) + k / group];
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            f.word[j] = pack_bf16x2(ggml_at(q, fmt - 16, n, k + 2 * j, K), ggml_at(q, fmt - 16, n, k + 2 * j + 1, K));
    }
}

// The 16 bf16 weights of a fetch, in k order, as 8 pairs.
__device__ __forceinline__ void wq_convert(const WqFetch& f, int fmt, unsigned out[8]) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
        float lo, hi;
        if (fmt == 0) {
            unsigned w = f.word[j >> 1] >> (16 * (j & 1));
            lo = (float)(signed char)(w & 255) * f.scale;
            hi = (float)(signed char)((w >> 8) & 255) * f.scale;
        } else if (fmt == 2) {
            unsigned w = f.word[j >> 1] >> (16 * (j & 1));
            __nv_fp8_e4m3 a, b;
            a.__x = w & 255;
            b.__x = (w >> 8) & 255;
            lo = (float)a * f.scale;
            hi = (float)b * f.scale;
        } else if (fmt == 1) {
            unsigned w = f.word[j >> 2] >> (8 * (j & 3));  // one byte: low nibble first
            int a = w & 15, b = (w >> 4) & 15;
            lo = (float)(a >= 8 ? a - 16 : a) * f.scale;
            hi = (float)(b >= 8 ? b - 16 : b) * f.scale;
        } else {
            out[j] = f.word[j];
            continue;
        }
        out[j] = pack_bf16x2(lo, hi);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_wq_mma_bf16(const bf16* __restrict__ A, const unsigned char* __restrict__ Wq, const float* __restrict__ scales,
                     int fmt, int group, const bf16* __restrict__ bias, int bias_mode, bf16* __restrict__ C, int M, int N,
                     int K, i64 ldc) {
    __shared__ __align__(16) MmaTileSmem smem;
    const i64 m0 = (i64)blockIdx.y * TILE_M, n0 = (i64)blockIdx.x * TILE_N;
    const unsigned char* a_bytes = reinterpret_cast<const unsigned char*>(A);
    const i64 row_bytes = (i64)K * 2;
    // This thread's 16 weights per k tile: row tid / 2, elements 16 · (tid % 2) onwards.
    const int w_row = threadIdx.x >> 1, w_half = threadIdx.x & 1;
    auto store_w = [&](int stage, const WqFetch& f) {
        unsigned v[8];
        wq_convert(f, fmt, v);
        uint4* dst = reinterpret_cast<uint4*>(&smem.w[stage][w_row * TILE_LDS + w_half * 32]);
        dst[0] = make_uint4(v[0], v[1], v[2], v[3]);
        dst[1] = make_uint4(v[4], v[5], v[6], v[7]);
    };
    // K % 16 == 0: a thread's 16 elements are all inside K or all past it.
    auto fetch = [&](WqFetch& f, i64 kt) {
        int k = (int)(kt * 32) + w_half * 16;
        wq_fetch(f, Wq, scales, fmt, group, k < K ? n0 + w_row : N, k, N, K);
    };

    float acc[4][4][4];
    mma_tile_zero(acc);
    const i64 ktiles = (K + 31) / 32;
    WqFetch f;
    mma_tile_load_rows(smem.a[0], a_bytes, M, row_bytes, m0, 0);
    cp_async_commit();
    fetch(f, 0);
    store_w(0, f);
    for (i64 kt = 0; kt < ktiles; kt++) {
        const int cur = kt & 1;
        const bool more = kt + 1 < ktiles;
        if (more) {
            mma_tile_load_rows(smem.a[cur ^ 1], a_bytes, M, row_bytes, m0, (kt + 1) * TILE_KB);
            cp_async_commit();
            fetch(f, kt + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        mma_tile_stage<mma_bf16_16816>(smem.a[cur], smem.w[cur], acc);
        // Stage cur ^ 1 was last read before the previous iteration's closing barrier.
        if (more) store_w(cur ^ 1, f);
        __syncthreads();
    }
    mma_tile_store8(
        smem, acc, m0, n0, M, N, [&](i64 m, i64 n, float v) { return v + bias_at(bias, bias_mode, m, n); },
        [&](i64 m, i64 n, uint4 y, int count) { store_bf16_upto8(C + m * ldc + n, y, count); });
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_mma_bf16(const bf16* __restrict__ A, const bf16* __restrict__ W, const bf16* __restrict__ bias, int bias_mode,
                  bf16* __restrict__ C, int M, int N, int K, i64 ldc) {
    __shared__ __align__(16) MmaTileSmem smem;
    const i64 m0 = (i64)blockIdx.y * TILE_M, n0 = (i64)blockIdx.x * TILE_N;
    float acc[4][4][4];
    mma_tile_128x128<mma_bf16_16816>(smem, reinterpret_cast<const unsigned char*>(A),
                                     reinterpret_cast<const unsigned char*>(W), M, N, (i64)K * 2, m0, n0, acc);
    mma_tile_store8(
        smem, acc, m0, n0, M, N, [&](i64 m, i64 n, float v) { return v + bias_at(bias, bias_mode, m, n); },
        [&](i64 m, i64 n, uint4 y, int count) { store_bf16_upto8(C + m * ldc + n, y, count); });
}

// The gated residual of the DiT fused into the GEMM's epilogue (the CPU reference is linear then
// gated_add): C[m, n] = X[m, n] + gate[m / L, n] · y, y = (A · Wᵀ + bias)[m, n] rounded to bf16 as the
// linear's output would be. A [M, K] are the B·L token rows, X and C dense [M, N], gate rows `gs`
// apart. Saves gated_add's read of the GEMM output and its write-back. Same requirements as
// gemm_mma_bf16.
extern "C" __global__ void __launch_bounds__(256)
    gemm_mma_gated_bf16(const bf16* __restrict__ A, const bf16* __restrict__ W, const bf16* __restrict__ bias,
                        const bf16* __restrict__ X, const bf16* __restrict__ gate, i64 gs, int L,
                        bf16* __restrict__ C, int M, int N, int K) {
    __shared__ __align__(16) MmaTileSmem smem;
    const i64 m0 = (i64)blockIdx.y * TILE_M, n0 = (i64)blockIdx.x * TILE_N;
    float acc[4][4][4];
    mma_tile_128x128<mma_bf16_16816>(smem, reinterpret_cast<const unsigned char*>(A),
                                     reinterpret_cast<const unsigned char*>(W), M, N, (i64)K * 2, m0, n0, acc);
    // y, the linear's output, is staged as bf16 (rounded as the linear's own output would be).
    mma_tile_store8(
        smem, acc, m0, n0, M, N, [&](i64, i64 n, float v) { return v + (bias ? to_f(bias[n]) : 0.f); },
        [&](i64 m, i64 n, uint4 y, int count) { gated_store8(X, gate, gs, L, C, N, m, n, y, count); });
}

// Columns for conv-as-GEMM: col[p][k] for output pixels p0..p0+np of one image, k = (ci, ky, kx).
// x [Cin, H, W]; zero padding (top pad_t, left pad_l; bottom/right implied by the output size).
extern "C" __global__ void im2col_bf16(const bf16* x, bf16* col, int cin, int h, int w, int kh, int kw, int stride,
                                       int pad_t, int pad_l, int wo, i64 p0, i64 np) {
    i64 kdim = (i64)cin * kh * kw;
    GRID_STRIDE(i, np * kdim) {
        i64 p = p0 + i / kdim;
        int k = (int)(i % kdim);
        int ci = k / (kh * kw), ky = (k / kw) % kh, kx = k % kw;
        int oy = (int)(p / wo), ox = (int)(p % wo);
        int iy = oy * stride + ky - pad_t, ix = ox * stride + kx - pad_l;
        col[i] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[((i64)ci * h + iy) * w + ix] : to_bf(0.f);
    }
}
