// Attention output quantized for the FP8 linears that read it, in the attention kernel itself (the
// double block's output projections): the per-token e4m3 codes and scales quantize_rows_e4m3_bf16
// (quantized.cu) makes from the stored bf16 rows, without that pass. A token's scale needs its row's
// |max| over every head, and each head is another block: each block stores its bf16 rows as usual
// and max-reduces their |max| into the row maxima (e4m3_rows_max); then it counts itself in for its
// query tile, and the block completing the tile's count (the last of its heads) quantizes the tile's
// full rows from L2 (e4m3_rows_finish). The launcher zeroes `scratch` before the launch and orders
// the grid heads-fastest, so tiles complete, and are quantized, while later tiles still compute.
#pragma once
#include <cuda_fp8.h>
#include "common.cuh"

__device__ __forceinline__ unsigned pack_e4m3x4(float a, float b, float c, float d) {
    __nv_fp8_e4m3 qa(a), qb(b), qc(c), qd(d);
    return (unsigned)qa.__x | ((unsigned)qb.__x << 8) | ((unsigned)qc.__x << 16) | ((unsigned)qd.__x << 24);
}

// Where the codes go (src/backend/cuda/e4m3_rows.rs builds it): token n of sample b to part 0 (n <
// split: row b·split + n) or part 1 (row b·(nq − split) + n − split), each part [rows, cols] codes
// and [rows] scales. scratch: the B·nq row maxima (f32 bits), then a count per (sample, query tile).
struct E4m3Split {
    unsigned char* codes[2];
    float* scales[2];
    unsigned* scratch;
    int split;
    int pad_;
};

// The |max| of this thread's share `m` of row `row` (of sample b) into its row maximum. Maxima are
// non-negative and never NaN (fmaxf drops NaN, as quantize_row_e4m3 does), so the float order is the
// integer order of their bits.
__device__ __forceinline__ void e4m3_rows_max(const E4m3Split& e, int b, int nq, int row, float m) {
    atomicMax(e.scratch + (i64)b * nq + row, __float_as_uint(m));
}

// A quad's maxima of its two rows (row0, row0 + 8 of sample b: the m16n8 accumulator layout; each
// lane's row_max from the store) into the rows' maxima.
__device__ __forceinline__ void quad_rows_max(const E4m3Split& e, int b, int nq, int row0, const float row_max[2]) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
        float m = fmaxf(row_max[half], __shfl_xor_sync(FULL_MASK, row_max[half], 1));
        m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, 2));
        if ((threadIdx.x & 3) == 0 && row0 + half * 8 < nq) e4m3_rows_max(e, b, nq, row0 + half * 8, m);
    }
}

// Called by every thread of the block after it stored rows [q0, q0 + rows) of one head of sample b
// (tile `tile` of `tiles`) and their maxima: the block completing the tile's `heads` quantizes its
// rows, cols = heads · d values each (a multiple of 8; rows 16-byte aligned), from `out` [B, nq, cols].
__device__ __forceinline__ void e4m3_rows_finish(const E4m3Split& e, const bf16* out, int b, int tile, int tiles,
                                                 int q0, int rows, int nq, int heads, int cols) {
    __shared__ unsigned last;
    __threadfence();  // this thread's rows and maxima, before the count says they are there
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(e.scratch + (i64)gridDim.z * nq + (i64)b * tiles + tile, 1u) == heads - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();  // the other heads' rows, after their counts
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    rows = min(rows, nq - q0);
    for (int r = warp; r < rows; r += warps) {
        const int n = q0 + r, part = n >= e.split;
        const i64 src = (i64)b * nq + n;
        const i64 dst = part ? (i64)b * (nq - e.split) + n - e.split : (i64)b * e.split + n;
        const float sc = __uint_as_float(__ldcg(e.scratch + src)) / 448.f, inv = sc > 0.f ? 1.f / sc : 0.f;
        const uint4* x = reinterpret_cast<const uint4*>(out + src * cols);
        // Selects, not e.codes[part]: a run-time index into the parameter would copy it to the stack.
        uint2* q = reinterpret_cast<uint2*>((part ? e.codes[1] : e.codes[0]) + dst * cols);
        for (int c = lane; c < cols / 8; c += 32) {
            float f[8];
            unpack_bf16x8(__ldcg(x + c), f);
            q[c] = make_uint2(pack_e4m3x4(f[0] * inv, f[1] * inv, f[2] * inv, f[3] * inv),
                              pack_e4m3x4(f[4] * inv, f[5] * inv, f[6] * inv, f[7] * inv));
        }
        if (lane == 0) (part ? e.scales[1] : e.scales[0])[dst] = sc;
    }
}
