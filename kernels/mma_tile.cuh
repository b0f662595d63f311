// The 128x128 block tile of the tensor-core GEMMs (gemm_mma_bf16, gemm_w8a8_mma_e4m3), counted in
// bytes so that 16-bit and 8-bit operands share it: 8 warps (2 along M x 4 along N, 64x32
// outputs each), 64 bytes of K per stage in a 2-stage cp.async pipeline, rows padded to 80 bytes
// (conflict-free ldmatrix), and per 32-byte k step one mma per 16x8 output tile. `Mma` is the
// m16n8 instruction for the element type (m16n8k16 bf16 or m16n8k32 e4m3: 32 bytes of K each);
// both take the same ldmatrix fragments.
#pragma once
#include "common.cuh"

#define TILE_M 128
#define TILE_N 128
#define TILE_KB 64                   // bytes of K per stage
#define TILE_LDS (TILE_KB + 16)      // padded shared row, bytes

typedef void (*MmaOp)(float d[4], const unsigned a[4], unsigned b0, unsigned b1);

// The two stages of A and W tiles; each kernel declares its own (__shared__ in the kernel, so its
// static shared memory is the kernel's in every image format).
struct MmaTileSmem {
    unsigned char a[2][TILE_M * TILE_LDS];
    unsigned char w[2][TILE_N * TILE_LDS];
};

__device__ __forceinline__ void mma_tile_zero(float acc[4][4][4]) {
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.f;
}

// One stage: acc += the stage's 64 bytes of K. A rows are TILE_LDS bytes apart in shared memory;
// `b_row(nj)` is this lane's B row address for its 16-pixel/column group nj (0, 1) of the warp's 32,
// at k byte 0 of the stage, with the lane's 16-byte half already added (the ldmatrix_x4 address).
template <MmaOp Mma, typename BRow>
__device__ __forceinline__ void mma_tile_stage_rows(const unsigned char* As, BRow b_row, float acc[4][4][4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int warp_m = warp >> 2;
#pragma unroll
    for (int ks = 0; ks < TILE_KB; ks += 32) {
        unsigned a[4][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; mi++) {
            int row = warp_m * 64 + mi * 16 + (lane & 15);
            ldmatrix_x4(a[mi], &As[row * TILE_LDS + ks + (lane >> 4) * 16]);
        }
#pragma unroll
        for (int nj = 0; nj < 2; nj++) {
            unsigned r[4];
            ldmatrix_x4(r, b_row(nj) + ks);
            b[2 * nj][0] = r[0];
            b[2 * nj][1] = r[1];
            b[2 * nj + 1][0] = r[2];
            b[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++) Mma(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
}

// One stage with W rows TILE_LDS bytes apart in shared memory, like A.
template <MmaOp Mma>
__device__ __forceinline__ void mma_tile_stage(const unsigned char* As, const unsigned char* Ws, float acc[4][4][4]) {
    const int warp_n = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    mma_tile_stage_rows<Mma>(
        As,
        [&](int nj) {
            int row = warp_n * 32 + nj * 16 + (lane & 7) + (lane >> 4) * 8;
            return &Ws[row * TILE_LDS + ((lane >> 3) & 1) * 16];
        },
        acc);
}

// Rows [m0, m0 + 128) of A into a stage by cp.async (zeros past M and past the row), not committed.
__device__ __forceinline__ void mma_tile_load_rows(unsigned char* dst, const unsigned char* __restrict__ A, int M,
                                                   i64 row_bytes, i64 m0, i64 k0) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int c = threadIdx.x + i * 256;
        int row = c >> 2, col = (c & 3) * 16;
        i64 gk = k0 + col, gm = m0 + row;
        bool ok = gm < M && gk < row_bytes;
        cp_async16(&dst[row * TILE_LDS + col], ok ? (const void*)(A + gm * row_bytes + gk) : (const void*)A, ok ? 16 : 0);
    }
}

// acc[mi][ni][e]: the warp's 4x4 tiles of 16x8 f32 accumulators; element e of tile (mi, ni) is at
// row warp_m*64 + mi*16 + lane/4 (+8 for e >= 2), column warp_n*32 + ni*8 + 2*(lane%4) + (e & 1).
// A [M, K] and W [N, K] rows are `row_bytes` long (a multiple of 16) and 16-byte aligned.
template <MmaOp Mma>
__device__ __forceinline__ void mma_tile_128x128(MmaTileSmem& smem, const unsigned char* __restrict__ A,
                                                 const unsigned char* __restrict__ W, int M, int N, i64 row_bytes,
                                                 i64 m0, i64 n0, float acc[4][4][4]) {
    mma_tile_zero(acc);
    // Each stage: 128 rows x 64 bytes of A and of W in 16-byte chunks (512 each, 2 per thread).
    auto load = [&](int stage, i64 k0) {
        mma_tile_load_rows(smem.a[stage], A, M, row_bytes, m0, k0);
        mma_tile_load_rows(smem.w[stage], W, N, row_bytes, n0, k0);
        cp_async_commit();
    };

    const i64 ktiles = (row_bytes + TILE_KB - 1) / TILE_KB;
    load(0, 0);
    for (i64 kt = 0; kt < ktiles; kt++) {
        const int cur = kt & 1;
        if (kt + 1 < ktiles) {
            load(cur ^ 1, (kt + 1) * TILE_KB);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        mma_tile_stage<Mma>(smem.a[cur], smem.w[cur], acc);
        __syncthreads();
    }
}

// This thread's accumulators in pairs of adjacent columns: visit(r, c, lo, hi), (r, c) the
// tile-relative row and first column of the pair (the layout above).
template <typename Visit>
__device__ __forceinline__ void mma_tile_pairs(const float acc[4][4][4], Visit visit) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int half = 0; half < 2; half++)
                visit((warp >> 2) * 64 + mi * 16 + (lane >> 2) + half * 8, (warp & 3) * 32 + ni * 8 + (lane & 3) * 2,
                      acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
}

// The epilogue walk: store(m, n, value) for each of this thread's accumulators inside [M, N).
template <typename Store>
__device__ __forceinline__ void mma_tile_store(const float acc[4][4][4], i64 m0, i64 n0, int M, int N, Store store) {
    mma_tile_pairs(acc, [&](int r, int c, float lo, float hi) {
        const i64 m = m0 + r, n = n0 + c;
        if (m >= M) return;
        if (n < N) store(m, n, lo);
        if (n + 1 < N) store(m, n + 1, hi);
    });
}

// The staged epilogue: 16-byte stores instead of one bf16 per store. Each accumulator inside
// [M, N), mapped by `value(m, n, v)` to what the output holds before rounding (bias added, scales
// applied), is rounded to bf16 into the pipeline's shared buffers (idle after the main loop's
// closing barrier); then each thread hands 8 consecutive columns of a row at a time to
// `store8(m, n, y, count)`, y the 8 staged values, count < 8 only at the right edge.
#define STAGE_LD (TILE_N + 8)  // bf16 per staged row: 272 bytes, 16-byte aligned, 4 banks apart
static_assert(TILE_M * STAGE_LD * 2 <= sizeof(MmaTileSmem), "the staged tile fits the pipeline buffers");

template <typename Value, typename Store8>
__device__ __forceinline__ void mma_tile_store8(MmaTileSmem& smem, const float acc[4][4][4], i64 m0, i64 n0, int M,
                                                int N, Value value, Store8 store8) {
    bf16* stage = reinterpret_cast<bf16*>(&smem);
    mma_tile_pairs(acc, [&](int r, int c, float lo, float hi) {
        const i64 m = m0 + r, n = n0 + c;
        // Outside [M, N) nothing is read (bias, scales) and nothing staged is stored.
        const bool row = m < M;
        lo = row && n < N ? value(m, n, lo) : 0.f;
        hi = row && n + 1 < N ? value(m, n + 1, hi) : 0.f;
        *reinterpret_cast<unsigned*>(&stage[r * STAGE_LD + c]) = pack_bf16x2(lo, hi);
    });
    __syncthreads();
#pragma unroll
    for (int i = 0; i < TILE_M * TILE_N / 8 / 256; i++) {
        const int chunk = threadIdx.x + i * 256;
        const int r = chunk >> 4, c = (chunk & 15) * 8;
        const i64 m = m0 + r, n = n0 + c;
        if (m < M && n < N) {
            const uint4 y = *reinterpret_cast<const uint4*>(&stage[r * STAGE_LD + c]);
            store8(m, n, y, (int)(N - n < 8 ? N - n : 8));
        }
    }
}

// The GEMM epilogue's bias: mode 0 none, 1 per column (bias[n], Linear), 2 per row (bias[m], conv as
// W · colᵀ).
__device__ __forceinline__ float bias_at(const bf16* bias, int mode, i64 m, i64 n) {
    return mode == 1 ? to_f(bias[n]) : mode == 2 ? to_f(bias[m]) : 0.f;
}

// The first `count` of 8 bf16 `y` to dst: one 16-byte store when all 8 go and dst is aligned.
__device__ __forceinline__ void store_bf16_upto8(bf16* dst, uint4 y, int count) {
    if (count == 8 && (reinterpret_cast<unsigned long long>(dst) & 15) == 0) {
        *reinterpret_cast<uint4*>(dst) = y;
        return;
    }
    float v[8];
    unpack_bf16x8(y, v);
#pragma unroll
    for (int j = 0; j < 8; j++)
        if (j < count) dst[j] = to_bf(v[j]);  // exact: v[j] is a bf16 value
}

// The DiT's gated residual as a GEMM epilogue (gemm_mma_gated_bf16, gemm_wgmma_gated_bf16): for the
// staged bf16 linear outputs y (8 columns from (m, n), `count` valid), C = X + gate[m / L] · y with
// X and C dense [M, N] and gate rows `gs` apart; 16-byte loads and stores where all 8 go aligned.
__device__ __forceinline__ void gated_store8(const bf16* __restrict__ X, const bf16* __restrict__ gate, i64 gs, int L,
                                             bf16* __restrict__ C, int N, i64 m, i64 n, uint4 y, int count) {
    int token;
    const i64 b = div_rem(m, L, token);
    const bf16 *x = X + m * N + n, *g = gate + b * gs + n;
    bf16* out = C + m * N + n;
    float yv[8];
    unpack_bf16x8(y, yv);
    const bool vec = count == 8 && ((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(g) |
                                     reinterpret_cast<unsigned long long>(out)) & 15) == 0;
    if (vec) {
        float xf[8], gf[8], r[8];
        load_bf16x8(x, xf);
        load_bf16x8(g, gf);
#pragma unroll
        for (int j = 0; j < 8; j++) r[j] = xf[j] + gf[j] * yv[j];
        store_bf16x8(out, r);
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j < count) out[j] = to_bf(to_f(x[j]) + to_f(g[j]) * yv[j]);
    }
}
