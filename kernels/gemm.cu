// Matrix products C = A · Wᵀ (+ bias): A [M, K] row-major, W [N, K] row-major (PyTorch Linear
// weights), C [M, N] with leading dimension ldc. bf16 in, f32 accumulate, bf16 out.
//   v1 gemm_tiled_bf16: smem-tiled FMA, any shape and alignment (the correctness baseline).
//   v2 gemm_mma_bf16:   tensor cores (mma.sync m16n8k16 + ldmatrix), the 128x128 tile of
//                       mma_tile.cuh (32 bf16 of K per stage); needs K % 8 == 0 and 16-byte aligned rows.
// bias_mode: 0 none, 1 per column (bias[n], Linear), 2 per row (bias[m], conv as W · colᵀ).
#include <cuda_fp8.h>

#include "common.cuh"
#include "ggml_blocks.cuh"
#include "mma_tile.cuh"

__device__ __forceinline__ float bias_at(const bf16* bias, int mode, i64 m, i64 n) {
    return mode == 1 ? to_f(bias[n]) : mode == 2 ? to_f(bias[m]) : 0.f;
}

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

extern "C" __global__ void __launch_bounds__(256)
    gemm_mma_bf16(const bf16* __restrict__ A, const bf16* __restrict__ W, const bf16* __restrict__ bias, int bias_mode,
                  bf16* __restrict__ C, int M, int N, int K, i64 ldc) {
    __shared__ __align__(16) MmaTileSmem smem;
    const i64 m0 = (i64)blockIdx.y * TILE_M, n0 = (i64)blockIdx.x * TILE_N;
    float acc[4][4][4];
    mma_tile_128x128<mma_bf16_16816>(smem, reinterpret_cast<const unsigned char*>(A),
                                     reinterpret_cast<const unsigned char*>(W), M, N, (i64)K * 2, m0, n0, acc);
    mma_tile_store(acc, m0, n0, M, N,
                   [&](i64 m, i64 n, float v) { C[m * ldc + n] = to_bf(v + bias_at(bias, bias_mode, m, n)); });
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
