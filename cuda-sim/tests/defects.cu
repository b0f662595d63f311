// Small kernels for the emulator's own tests (tests/cuda_sim.rs): each seeded defect next to a
// correct twin, so a test can show the checker reports the one and passes the other. Compiled by
// NVRTC at test time and into the emulator's host build (module "defects").
#include <cuda_fp8.h>

#include "common.cuh"

// Thread i writes s[i], then reads s[(i + 32) % 64], written by another warp.
extern "C" __global__ void race_missing_barrier(float* out) {
    __shared__ float s[64];
    int i = threadIdx.x;
    s[i] = (float)i;
    out[i] = s[(i + 32) % 64];
}
extern "C" __global__ void race_with_barrier(float* out) {
    __shared__ float s[64];
    int i = threadIdx.x;
    s[i] = (float)i;
    __syncthreads();
    out[i] = s[(i + 32) % 64];
}

// Writes out[0..n] inclusive: one element past an n-element buffer when `past_end`.
extern "C" __global__ void write_elements(float* out, int n, int past_end) {
    int last = past_end ? n : n - 1;
    for (int i = threadIdx.x; i <= last; i += blockDim.x) out[i] = 1.f;
}

// cp.async of 16 bytes into shared offset `offset` bytes (16-aligned or not), then back out.
extern "C" __global__ void cp_async_to_offset(const bf16* src, bf16* out, int offset) {
    __shared__ __align__(16) bf16 s[32];
    if (threadIdx.x == 0) {
        cp_async16(reinterpret_cast<unsigned char*>(s) + offset, src, 16);
        cp_async_commit();
        cp_async_wait<0>();
        for (int i = 0; i < 8; i++) out[i] = s[offset / 2 + i];
    }
}

// Reads shared memory a cp.async is still writing when `wait` is 0.
extern "C" __global__ void cp_async_read_early(const bf16* src, bf16* out, int wait) {
    __shared__ __align__(16) bf16 s[8];
    cp_async16(s, src, 16);
    cp_async_commit();
    if (wait) cp_async_wait<0>();
    out[0] = s[0];
    cp_async_wait<0>();
}

// Uses `n` floats of dynamic shared memory (the launch's sharedMemBytes).
extern "C" __global__ void dynamic_smem_sum(float* out, int n) {
    float* s = dynamic_smem<float>();
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 1.f;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int i = 0; i < n; i++) sum += s[i];
        out[0] = sum;
    }
}

// Half the block stops before a barrier the other half waits at.
extern "C" __global__ void barrier_divergent(float* out, int diverge) {
    if (diverge && threadIdx.x >= 16) return;
    __syncthreads();
    out[threadIdx.x] = 1.f;
}

// A 16x8 f32 accumulator fragment to row-major D (lane = 4g + c).
__device__ __forceinline__ void store_accumulators(float* D, const float d[4], int g, int c) {
    D[g * 8 + 2 * c] = d[0];
    D[g * 8 + 2 * c + 1] = d[1];
    D[(g + 8) * 8 + 2 * c] = d[2];
    D[(g + 8) * 8 + 2 * c + 1] = d[3];
}

// One warp: D[16x8] = A[16x16] · B, A row-major, B given as Bt [8][16] (n-major, "col"); the
// fragments are loaded from global memory by the PTX layout. `permute` swaps a1 and a2, the kind
// of fragment bug a plain matrix product exposes.
extern "C" __global__ void mma_bf16_tile(const bf16* A, const bf16* Bt, float* D, int permute) {
    int lane = threadIdx.x, g = lane / 4, c = lane % 4;
    auto pair = [](const bf16* p) {
        return (unsigned)__bfloat16_as_ushort(p[0]) | ((unsigned)__bfloat16_as_ushort(p[1]) << 16);
    };
    unsigned a[4] = {pair(&A[g * 16 + 2 * c]), pair(&A[(g + 8) * 16 + 2 * c]), pair(&A[g * 16 + 2 * c + 8]),
                     pair(&A[(g + 8) * 16 + 2 * c + 8])};
    if (permute) {
        unsigned t = a[1];
        a[1] = a[2];
        a[2] = t;
    }
    unsigned b0 = pair(&Bt[g * 16 + 2 * c]), b1 = pair(&Bt[g * 16 + 2 * c + 8]);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_bf16_16816(d, a, b0, b1);
    store_accumulators(D, d, g, c);
}

// One warp: D[16x8] = A[16x32] · B with e4m3 codes, A row-major bytes, Bt [8][32] bytes.
extern "C" __global__ void mma_e4m3_tile(const unsigned char* A, const unsigned char* Bt, float* D) {
    int lane = threadIdx.x, g = lane / 4, c = lane % 4;
    auto quad = [](const unsigned char* p) {
        return (unsigned)p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) | ((unsigned)p[3] << 24);
    };
    unsigned a[4] = {quad(&A[g * 32 + 4 * c]), quad(&A[(g + 8) * 32 + 4 * c]), quad(&A[g * 32 + 4 * c + 16]),
                     quad(&A[(g + 8) * 32 + 4 * c + 16])};
    unsigned b0 = quad(&Bt[g * 32 + 4 * c]), b1 = quad(&Bt[g * 32 + 4 * c + 16]);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_e4m3_16832(d, a, b0, b1);
    store_accumulators(D, d, g, c);
}

// Warp shuffles: out[i] = sum over the warp (xor butterfly) + the value of lane (i + 1) % 32.
extern "C" __global__ void warp_shuffles(const float* in, float* out) {
    int lane = threadIdx.x & 31;
    float v = in[threadIdx.x];
    float sum = warp_sum(v);
    float next = __shfl_sync(FULL_MASK, v, (lane + 1) & 31);
    out[threadIdx.x] = sum + next;
}

// Global float atomics from many blocks: deterministic under the emulator's block order.
extern "C" __global__ void atomic_sum(const float* in, float* out, int n) {
    GRID_STRIDE(i, n) atomicAdd(out, in[i]);
}

// The conversions kernels use, value by value: bf16 (round to nearest even) and e4m3 (satfinite).
extern "C" __global__ void convert_f32(const float* in, unsigned short* bf, unsigned char* e4m3, int n) {
    GRID_STRIDE(i, n) {
        bf[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
        __nv_fp8_e4m3 v(in[i]);
        e4m3[i] = v.__x;
    }
}

#include "hopper.cuh"

// One warpgroup: D[64x128] = A[64xK] · Bt[128xK]ᵀ for K <= 64 bf16, both tiles brought by TMA
// (64-element boxes, 128-byte swizzle: rows past the tensors read as zero) onto one mbarrier,
// then four wgmma m64n128k16 from swizzled descriptors. Seeded defects: 1 issues the wgmmas
// without waiting on the barrier; 2 announces fewer bytes than the copies bring; 3 waits for a
// phase that never comes; 4 reads the accumulators before wgmma.wait_group. 5 takes A from
// registers (wgmma ..._rs, correct); 6 does so with one lane gone; 7 leaves one thread out of the
// shared-memory wgmma, which then never completes for the others. 8 hands the warpgroup 232 registers
// per thread first (setmaxnreg.inc, correct); 9 asks for different counts in different warps (a count
// that is not a multiple of 8 in 24..256 never compiles: ptxas refuses the constant).
extern "C" __global__ void tma_wgmma_tile(const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tb,
                                          float* D, int defect) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    unsigned char* smem = dynamic_smem<unsigned char>();
    smem += (1024 - (__cvta_generic_to_shared(smem) & 1023)) & 1023;
    unsigned char* a = smem;             // 64 rows x 128 bytes
    unsigned char* b = smem + 64 * 128;  // 128 rows x 128 bytes
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(smem + 192 * 128);
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
    }
    __syncthreads();
    if (defect == 8 || (defect == 9 && threadIdx.x < 32)) setmaxnreg_inc<232>();
    if (defect == 9 && threadIdx.x >= 32) setmaxnreg_inc<240>();
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, defect == 2 ? 64 * 128 : 192 * 128);
        tma_load_2d(a, &ta, 0, 0, bar);
        tma_load_2d(b, &tb, 0, 0, bar);
    }
    if (defect != 1) mbarrier_wait(bar, 0);
    if (defect == 3) mbarrier_wait(bar, 1);
    float acc[64];
    for (int i = 0; i < 64; i++) acc[i] = 0.f;
    if ((defect == 6 || defect == 7) && threadIdx.x == 5) return;  // a thread missing from the wgmma
    wgmma_fence();
    for (int kk = 0; kk < 4; kk++) {
        if (defect < 5 || defect == 7) {
            wgmma_bf16_m64n128k16(acc, wgmma_desc_sw128(a + kk * 32), wgmma_desc_sw128(b + kk * 32), 1);
            continue;
        }
        // A from registers: this lane's fragment of its warp's 16 rows, read back from the swizzled
        // tile (16-byte chunk c of row r sits at chunk c ^ (r % 8)).
        auto at = [&](int r, int col) -> unsigned {
            const int byte = col * 2;
            return *reinterpret_cast<const unsigned short*>(a + r * 128 + ((((byte >> 4) ^ (r & 7)) << 4) | (byte & 15)));
        };
        const int r = 16 * ((threadIdx.x >> 5) & 3) + ((threadIdx.x & 31) >> 2), c = kk * 16 + 2 * (threadIdx.x & 3);
        unsigned frag[4];
        for (int q = 0; q < 4; q++) {
            const int rr = r + 8 * (q & 1), cc = c + 8 * (q >> 1);
            frag[q] = at(rr, cc) | (at(rr, cc + 1) << 16);
        }
        wgmma_bf16_m64n128k16_rs(acc, frag, wgmma_desc_sw128(b + kk * 32), 1);
    }
    wgmma_commit();
    float early = acc[0];
    wgmma_wait<0>();
    if (defect == 4) acc[0] = early;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 4; j++)
            D[(16 * w + (lane >> 2) + (j >= 2 ? 8 : 0)) * 128 + 8 * i + 2 * (lane & 3) + (j & 1)] = acc[4 * i + j];
    if (defect == 1) mbarrier_wait(bar, 0);  // the copies must not outlive the block
#endif
}

// One warpgroup, 8-bit wgmma: A [64 x 128 bytes] and Bt [128 x 128 bytes] by TMA (128-byte swizzle).
// mode 0: D [64 x 64] s32 = A · Bt[0..64)ᵀ as int8, four wgmma m64n64k32 s8 from shared memory;
// mode 1: D [64 x 128] f32 = A · Btᵀ as e4m3, four wgmma m64n128k32 with A from registers (each
// lane's m16n8k32 fragment read back from the swizzled tile: four consecutive K bytes a register).
extern "C" __global__ void wgmma_8bit_tile(const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tb,
                                           int* Ds, float* Df, int mode) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    unsigned char* smem = dynamic_smem<unsigned char>();
    smem += (1024 - (__cvta_generic_to_shared(smem) & 1023)) & 1023;
    unsigned char* a = smem;             // 64 rows x 128 bytes
    unsigned char* b = smem + 64 * 128;  // 128 rows x 128 bytes
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(smem + 192 * 128);
    ring_barriers_init(bar, nullptr, nullptr, 0);
    if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, 192 * 128);
        tma_load_2d(a, &ta, 0, 0, bar);
        tma_load_2d(b, &tb, 0, 0, bar);
    }
    mbarrier_wait(bar, 0);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (mode == 0) {
        int acc[32];
        for (int i = 0; i < 32; i++) acc[i] = 0;
        wgmma_fence();
        for (int kk = 0; kk < 4; kk++) wgmma_s8_m64n64k32(acc, wgmma_desc_sw128(a + kk * 32), wgmma_desc_sw128(b + kk * 32), 1);
        wgmma_commit();
        wgmma_wait<0>();
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 4; j++)
                Ds[(16 * w + (lane >> 2) + (j >= 2 ? 8 : 0)) * 64 + 8 * i + 2 * (lane & 3) + (j & 1)] = acc[4 * i + j];
        return;
    }
    auto at = [&](int r, int byte) -> unsigned { return a[r * 128 + ((((byte >> 4) ^ (r & 7)) << 4) | (byte & 15))]; };
    float acc[64];
    for (int i = 0; i < 64; i++) acc[i] = 0.f;
    unsigned frag[4][4];
    wgmma_fence();
    for (int kk = 0; kk < 4; kk++) {
        const int r = 16 * w + (lane >> 2), c = kk * 32 + 4 * (lane & 3);
        for (int q = 0; q < 4; q++) {
            const int rr = r + 8 * (q & 1), cc = c + 16 * (q >> 1);
            frag[kk][q] = at(rr, cc) | (at(rr, cc + 1) << 8) | (at(rr, cc + 2) << 16) | (at(rr, cc + 3) << 24);
        }
        wgmma_e4m3_m64n128k32_rs(acc, frag[kk], wgmma_desc_sw128(b + kk * 32), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 4; j++)
            Df[(16 * w + (lane >> 2) + (j >= 2 ? 8 : 0)) * 128 + 8 * i + 2 * (lane & 3) + (j & 1)] = acc[4 * i + j];
#endif
}
