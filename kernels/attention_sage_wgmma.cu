// Sage attention v3 for Hopper (sm_90a): head dim 128, no mask (the DiT's attention; masked calls,
// other head dims and other targets keep v2, attention_sage_mma.cu, which stays the reference). Same
// numerics as v2 and the CPU emulation, tile for tile (sage_tile.cuh): 64-key tiles, each one K scale
// block, so the online softmax rescales at the same keys and P is rounded to e4m3 against the same
// running maxima; only the f32 summation order of P·V differs.
//
// Inputs are v2's pre-pass outputs: Q's and K's int8 codes [B, N, H, 128] with per-64-token block
// scales, Vᵀ's e4m3 codes [B·Hkv, 128, nk_pad] (keys permuted per 32 so that P's accumulators are the
// e4m3 A fragment), V's channel means and maxima.
//
// One block per 128 queries of one head, three warpgroups, as flash v4 (attention_wgmma.cu): warpgroup
// 0's first thread loads Q once and then each tile's K (64 keys x 128 bytes, 128-byte swizzle) and Vᵀ
// (128 channels x 64 keys, 64-byte swizzle) by TMA into a ring of SW_STAGES stages. Warpgroups 1 and 2
// own 64 query rows each (one Q scale block): S = Q·Kᵀ on wgmma s8 -> s32 (exact, both operands in
// shared memory), scores and the online softmax in registers, then O += P·V on wgmma e4m3 with P
// packed from the registers straight into A fragments and Vᵀ the K-major B operand. P·V of tile t
// stays in flight while S of tile t+1 is issued; a stage goes back to the producer when both
// warpgroups' wgmmas on it have retired.
//
// attention_sage_wgmma_e4m3out_d128 also writes the output as the e4m3 rows of the FP8 linears that read
// it (e4m3_rows.cuh; grid heads first): the producer warpgroup stays to the end and helps the consumers
// quantize a query tile when this block completes its heads. ptxas: 135 registers (152 without), no stack.
//
// Budget: S 32 s32 + P 8 + O 64 f32 registers per thread; Q 16 KB + 4 stages of 16 KB (+ 1 KB of
// alignment slack): 81 KB of shared memory, one block (12 warps) per SM. Keys of a ragged last tile past
// Nk (or the next sequence's rows of K) are hidden before the softmax, and their Vᵀ codes are zeros;
// rows of Q past Nq are computed and not stored.
#include "common.cuh"
#include "hopper.cuh"
#include "sage_tile.cuh"
#include "softmax_tile.cuh"

#define SW_STAGES 4
#define SW_THREADS 384
#define SW_D 128
#define SW_BQ 128
#define SW_BKV 64  // keys per tile: one K scale block (SAGE_TILE)
#define SW_Q_BYTES (SW_BQ * SW_D)     // 128 rows of 128 codes
#define SW_K_BYTES (SW_BKV * SW_D)    // 64 keys of 128 codes
#define SW_STAGE (SW_K_BYTES + SW_D * SW_BKV)  // + Vᵀ: 128 channels of 64 keys

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// QUANT: the output also as the FP8 linears' e4m3 rows into `e` (e4m3_rows.cuh), the grid heads
// first ((heads, query tiles, B)), and every warpgroup (the producer's too) quantizes a completed
// tile; else (query tiles, heads, B).
template <bool QUANT>
__device__ __forceinline__ void sage_wgmma(const TensorMap* tq, const TensorMap* tk, const TensorMap* tv,
                                           bf16* __restrict__ out, int nq, int nk, int heads, int kv_heads, float scale,
                                           const float* __restrict__ q_absmax, const float* __restrict__ k_absmax,
                                           const float* __restrict__ v_mean, const float* __restrict__ v_absmax,
                                           const E4m3Split& e) {
    constexpr int NT = SW_BKV / 8;
    unsigned char* smem = dynamic_smem<unsigned char>();
    smem += (1024 - (__cvta_generic_to_shared(smem) & 1023)) & 1023;
    unsigned char* qs = smem;
    unsigned char* stages = smem + SW_Q_BYTES;
    unsigned long long* qbar = reinterpret_cast<unsigned long long*>(stages + SW_STAGES * SW_STAGE);
    unsigned long long* full = qbar + 1;
    unsigned long long* empty = full + SW_STAGES;

    const int h = QUANT ? blockIdx.x : blockIdx.y, tile = QUANT ? blockIdx.y : blockIdx.x;
    const int b = blockIdx.z, hk = h / (heads / kv_heads), q0 = tile * SW_BQ;
    const int wg = threadIdx.x >> 7, ntiles = (nk + SW_BKV - 1) / SW_BKV;
    const i64 bhk = (i64)b * kv_heads + hk;
    ring_barriers_init(qbar, full, empty, SW_STAGES);

    const i64 q_stride = (i64)heads * SW_D;
    if (wg == 0) {
        if (threadIdx.x == 0) {
            mbarrier_arrive_expect_tx(qbar, SW_Q_BYTES);
            tma_load_2d(qs, tq, h * SW_D, b * nq + q0, qbar);
            for (int t = 0; t < ntiles; t++) {
                const int s = t % SW_STAGES;
                unsigned char* st = stages + s * SW_STAGE;
                mbarrier_wait(&empty[s], ((t / SW_STAGES) & 1) ^ 1);  // the first round finds every stage empty
                mbarrier_arrive_expect_tx(&full[s], SW_STAGE);
                tma_load_2d(st, tk, hk * SW_D, b * nk + t * SW_BKV, &full[s]);
                tma_load_2d(st + SW_K_BYTES, tv, t * SW_BKV, (int)bhk * SW_D, &full[s]);
            }
        }
        if constexpr (QUANT) e4m3_rows_finish(e, out, b, tile, gridDim.y, q0, SW_BQ, nq, heads, heads * SW_D);
        return;
    }

    const int half = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const bool leader = (threadIdx.x & 127) == 0;
    const int q_blocks = (nq + SW_BKV - 1) / SW_BKV, k_blocks = (nk + SW_BKV - 1) / SW_BKV;
    // This warpgroup's 64 rows are one Q scale block (none past nq: its rows are not stored).
    const int q_blk = tile * 2 + half;
    const float sq = q_blk < q_blocks ? q_absmax[((i64)b * heads + h) * q_blocks + q_blk] / 127.f : 0.f;
    float o[SW_D / 8][4];
#pragma unroll
    for (int i = 0; i < SW_D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {NEG_INFINITY_F, NEG_INFINITY_F}, l_r[2] = {0.f, 0.f};
    const unsigned char* q_half = qs + half * 64 * 128;  // 8 swizzle atoms in
    mbarrier_wait(qbar, 0);

    // P's A fragments: those of tile t-1 are read by its P·V wgmmas until they retire during tile t.
    unsigned pf[SW_BKV / 32][4];
    for (int t = 0; t < ntiles; t++) {
        const int s = t % SW_STAGES;
        const unsigned char* st = stages + s * SW_STAGE;
        mbarrier_wait(&full[s], (t / SW_STAGES) & 1);

        int si[NT][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < SW_D / 32; kk++)
            wgmma_s8_m64n64k32(&si[0][0], wgmma_desc_sw128(q_half + kk * 32), wgmma_desc_sw128(st + kk * 32), kk > 0);
        wgmma_commit();
        if (t > 0) {
            // Tile t-1's P·V (issued before this S) has retired: O is settled, its stage goes back.
            wgmma_wait<1>();
            wgmma_fence_operand<SW_D / 2>(&o[0][0]);
            wgmma_fence_operand<SW_BKV / 8>(&pf[0][0]);
            if (leader) mbarrier_arrive(&empty[(t - 1) % SW_STAGES]);
        }
        wgmma_wait<0>();
        wgmma_fence_operand<SW_BKV / 2>(&si[0][0]);

        const int k0 = t * SW_BKV;
        const float sk = k_absmax[bhk * k_blocks + t] / 127.f;
        float p[NT][4], alpha[2];
        sage_softmax_tile<NT>(si, p, sq * sk, scale, k0, m_r, l_r, alpha, [&](int key, int) { return key < nk; });
        rescale_rows<SW_D / 8>(o, alpha);

        // O += P·V, left in flight while the next tile's S is issued.
#pragma unroll
        for (int kk = 0; kk < SW_BKV / 32; kk++) sage_p_fragment_e4m3<NT>(p, kk, pf[kk]);
        wgmma_fence_operand<SW_D / 2>(&o[0][0]);
        wgmma_fence_operand<SW_BKV / 8>(&pf[0][0]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < SW_BKV / 32; kk++)
            wgmma_e4m3_m64n128k32_rs(&o[0][0], pf[kk], wgmma_desc_sw64(st + SW_K_BYTES + kk * 32), 1);
        wgmma_commit();
    }
    wgmma_wait<0>();
    wgmma_fence_operand<SW_D / 2>(&o[0][0]);
    wgmma_fence_operand<SW_BKV / 8>(&pf[0][0]);

    const int row0 = q0 + half * 64 + warp * 16 + (lane >> 2);
    float row_max[2];
    sage_store_rows<SW_D / 8>(o, l_r, v_mean + bhk * SW_D, v_absmax + bhk * SW_D, out + (i64)b * nq * q_stride + (i64)h * SW_D,
                              row0, nq, q_stride, row_max);
    if constexpr (QUANT) {
        quad_rows_max(e, b, nq, row0, row_max);
        e4m3_rows_finish(e, out, b, tile, gridDim.y, q0, SW_BQ, nq, heads, heads * SW_D);
    }
}
#endif

// tq: Q's codes as [B·Nq, H·128] bytes, 128 x 128 boxes; tk: K's as [B·Nk, Hkv·128], 128 x 64 boxes
// (both with the 128-byte swizzle); tv: Vᵀ's as [B·Hkv·128, nk_pad], 64 x 128 boxes with the 64-byte
// swizzle (tensor_map.rs). q_absmax, k_absmax: the block maxima of Q's and K's codes; v_mean,
// v_absmax: V's per (batch, kv head, channel).
extern "C" __global__ void __launch_bounds__(SW_THREADS, 1)
    attention_sage_wgmma_d128(const __grid_constant__ TensorMap tq, const __grid_constant__ TensorMap tk,
                              const __grid_constant__ TensorMap tv, bf16* out, int nq, int nk, int heads, int kv_heads,
                              float scale, const float* q_absmax, const float* k_absmax, const float* v_mean,
                              const float* v_absmax) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    sage_wgmma<false>(&tq, &tk, &tv, out, nq, nk, heads, kv_heads, scale, q_absmax, k_absmax, v_mean, v_absmax,
                      E4m3Split{});
#else
    __trap();  // wgmma needs an sm_90a image: the launcher picks v2 elsewhere
#endif
}

// The same, the output also as the e4m3 rows of the FP8 linears that read it (e4m3_rows.cuh): grid
// (heads, query tiles, B), e.scratch zeroed.
extern "C" __global__ void __launch_bounds__(SW_THREADS, 1)
    attention_sage_wgmma_e4m3out_d128(const __grid_constant__ TensorMap tq, const __grid_constant__ TensorMap tk,
                                      const __grid_constant__ TensorMap tv, bf16* out, int nq, int nk, int heads,
                                      int kv_heads, float scale, const float* q_absmax, const float* k_absmax,
                                      const float* v_mean, const float* v_absmax, E4m3Split e) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    sage_wgmma<true>(&tq, &tk, &tv, out, nq, nk, heads, kv_heads, scale, q_absmax, k_absmax, v_mean, v_absmax, e);
#else
    __trap();
#endif
}
