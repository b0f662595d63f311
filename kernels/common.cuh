// Shared helpers for every kernel family: bf16 storage, f32 math, warp/block reductions,
// and the PTX wrappers (cp.async, ldmatrix, mma.sync) of the tensor-core kernels.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
// 64-bit integers in kernel signatures and index math: `long` is 32 bits on Windows (LLP64), and
// the Rust launchers pass i64.
typedef long long i64;

#define FULL_MASK 0xffffffffu
#define NEG_INFINITY_F __int_as_float(0xff800000)
// Grid-stride loop over [0, n): any grid size covers every element.
#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ bf16 to_bf(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Reduce over the block with `WarpOp` (`identity` fills the lanes past the last warp); every
// thread gets the result. `scratch` holds 32 floats.
template <float (*WarpOp)(float)>
__device__ __forceinline__ float block_reduce(float v, float* scratch, float identity) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = WarpOp(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return WarpOp(lane < warps ? scratch[lane] : identity);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce<warp_sum>(v, scratch, 0.f);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce<warp_max>(v, scratch, NEG_INFINITY_F);
}

// LayerNorm statistics of one row of c bf16 values, one block per row (two passes in f32): the
// mean, and 1/sqrt(variance + eps) returned. `scratch` holds 32 floats.
__device__ __forceinline__ float block_mean_rstd(const bf16* xr, int c, float eps, float* scratch, float& mean) {
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += to_f(xr[i]);
    mean = block_sum(s, scratch) / c;
    float v = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float d = to_f(xr[i]) - mean;
        v += d * d;
    }
    return rsqrtf(block_sum(v, scratch) / c + eps);
}

// Dynamic shared memory (the launch's sharedMemBytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef FLUX2_CUDA_SIM
    return reinterpret_cast<T*>(sim_dynamic_smem());
#else
    extern __shared__ __align__(16) unsigned char dynamic_smem_bytes[];
    return reinterpret_cast<T*>(dynamic_smem_bytes);
#endif
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.f + __expf(-x)); }

#ifdef FLUX2_CUDA_SIM
// The CPU emulator (cuda-sim/) has its own version of every wrapper below.
#include "sim_ptx.h"
#else
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; `bytes` = 0 fills the destination with zeros (out-of-range tiles).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// D[16x8] += A[16x16] (row) * B[16x8] (col), bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16_16816(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// D[16x8] += A[16x32] (row) * B[32x8] (col), 8-bit inputs (4 per register). e4m3 with f32
// accumulators needs sm_89 or newer; s8 with s32 accumulators sm_80.
__device__ __forceinline__ void mma_e4m3_16832(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_s8_16832(int d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // FLUX2_CUDA_SIM

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// The larger |value| of a packed bf16 pair (fmaxf: a NaN half is dropped).
__device__ __forceinline__ float bf16x2_absmax(unsigned packed) {
    return fmaxf(fabsf(__uint_as_float(packed << 16)), fabsf(__uint_as_float(packed & 0xffff0000u)));
}

// 8 bf16 packed in 16 bytes, widened to f32 exactly (bf16 is f32's top half).
__device__ __forceinline__ void unpack_bf16x8(uint4 v, float f[8]) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}

// 8 bf16 at p (16-byte aligned) in one 16-byte load, widened to f32 exactly.
__device__ __forceinline__ void load_bf16x8(const bf16* p, float f[8]) {
    unpack_bf16x8(*reinterpret_cast<const uint4*>(p), f);
}

// f[0..8) rounded to bf16 (nearest even) into one 16-byte store at p (16-byte aligned).
__device__ __forceinline__ void store_bf16x8(bf16* p, const float f[8]) {
    uint4 v;
    v.x = pack_bf16x2(f[0], f[1]);
    v.y = pack_bf16x2(f[2], f[3]);
    v.z = pack_bf16x2(f[4], f[5]);
    v.w = pack_bf16x2(f[6], f[7]);
    *reinterpret_cast<uint4*>(p) = v;
}

// q = i / d and r = i % d for 0 <= i, 0 < d: a 32-bit division while i fits in 32 bits (every
// klein tensor), the 64-bit one (a long software routine) only past that.
__device__ __forceinline__ i64 div_rem(i64 i, int d, int& r) {
    if ((unsigned long long)i <= 0xffffffffull) {
        unsigned q = (unsigned)i / (unsigned)d;
        r = (int)((unsigned)i - q * (unsigned)d);
        return q;
    }
    i64 q = i / d;
    r = (int)(i - q * d);
    return q;
}

