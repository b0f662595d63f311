// Flash attention v4 for Hopper (sm_90a), head dims 64 and 128, no mask (the DiT's attention; masked
// calls and other targets keep flash v3, attention_v3.cu, which stays the reference). q [B, Nq, H, D],
// k [B, Nk, Hkv, D] (GQA: kv head h / (H/Hkv)), vt = Vᵀ [B, Hkv, D, nk_pad] (transpose_v_bf16 below,
// keys past Nk zero), out [B, Nq, H, D].
//
// One block per 128 queries of one head: three warpgroups. Warpgroup 0's first thread is the producer:
// it loads the block's Q once and then the K and Vᵀ tiles of BKV keys into a ring of FA_STAGES stages,
// all by TMA with the 128-byte swizzle the wgmma descriptors read. Warpgroups 1 and 2 each own 64 query
// rows: per tile, S = Q·Kᵀ on wgmma (both operands in shared memory, K-major), the online softmax on
// the accumulators in registers (softmax_tile.cuh: a wgmma accumulator is, per warp, the m16n8 tile
// layout v3 uses), then O += P·V on wgmma with P straight from registers (the accumulator tile packed
// as bf16 A fragments, no trip through shared memory) and Vᵀ as the K-major B operand. P·V of tile t
// stays in flight while S of tile t+1 is issued; the stage goes back to the producer when both
// warpgroups' wgmmas on it have retired.
//
// Why Vᵀ: a K-major B operand is the layout the GEMMs and the emulator's wgmma already use; V itself
// would be an MN-major B (the transposed-B form). The transpose is one pass over V (~28 MB at klein-4B
// 1024², ~15 µs on an H100 against ~0.5 ms of attention); reading V MN-major is the next step.
//
// Budget: D = 128 with 64-key tiles (S 32 + O 64 + P 16 registers per thread), D = 64 with 128-key tiles
// (S 64 + O 32 + P 32); stages of 32 KB (K and Vᵀ), Q 16 or 32 KB: 130 KB / 114 KB of shared memory,
// one block (12 warps) per SM. Keys of a ragged last tile past Nk (or the next sequence's rows of K)
// are masked to -inf before the softmax; rows of Q past Nq are computed and not stored.
//
// flash_attention_v4_e4m3out_d{64,128}_bf16 also write the output as the e4m3 rows of the FP8 linears that
// read it (e4m3_rows.cuh; grid heads first): the producer warpgroup stays to the end and helps quantize a
// query tile when this block completes its heads. ptxas: the registers of the plain kernels, no stack.
#include "common.cuh"
#include "e4m3_rows.cuh"
#include "hopper.cuh"
#include "softmax_tile.cuh"

#define FA_STAGES 3
#define FA_THREADS 384

template <int D>
struct FaCfg {
    static constexpr int BQ = 128;                   // query rows per block (two warpgroups of 64)
    static constexpr int BKV = D == 64 ? 128 : 64;   // keys per tile
    static constexpr int Q_BOX = BQ * 128;           // one 64-wide slice of Q's 128 rows (bytes)
    static constexpr int Q_BYTES = (D / 64) * Q_BOX;
    static constexpr int K_BOX = BKV * 128;          // one 64-wide slice of d of a K tile
    static constexpr int V_BOX = D * 128;            // 64 keys of the Vᵀ tile's D rows
    static constexpr int STAGE_K = (D / 64) * K_BOX;
    static constexpr int STAGE = STAGE_K + (BKV / 64) * V_BOX;
    // 1 KB of slack to align to the swizzle atom, Q, the stages, then the barriers (q, full, empty).
    static constexpr int SMEM = 1024 + Q_BYTES + FA_STAGES * STAGE + (1 + 2 * FA_STAGES) * 8;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int N>
__device__ __forceinline__ void wgmma_s(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    if constexpr (N == 64)
        wgmma_bf16_m64n64k16(d, da, db, scale_d);
    else
        wgmma_bf16_m64n128k16(d, da, db, scale_d);
}

template <int N>
__device__ __forceinline__ void wgmma_pv(float* d, const unsigned a[4], unsigned long long db) {
    if constexpr (N == 64)
        wgmma_bf16_m64n64k16_rs(d, a, db, 1);
    else
        wgmma_bf16_m64n128k16_rs(d, a, db, 1);
}

// QUANT: the output also as the FP8 linears' e4m3 rows into `e` (e4m3_rows.cuh), the grid heads first
// ((heads, query tiles, B)), and the producer warpgroup stays to help quantize a completed tile; else
// (query tiles, heads, B).
template <int D, bool QUANT = false>
__device__ __forceinline__ void flash_v4(const TensorMap* tq, const TensorMap* tk, const TensorMap* tv, bf16* __restrict__ out,
                                         int nq, int nk, int heads, int kv_heads, float scale_log2,
                                         const E4m3Split& e = E4m3Split{}) {
    using C = FaCfg<D>;
    constexpr int BKV = C::BKV, NT = BKV / 8;
    unsigned char* smem = dynamic_smem<unsigned char>();
    smem += (1024 - (__cvta_generic_to_shared(smem) & 1023)) & 1023;
    unsigned char* qs = smem;
    unsigned char* stages = smem + C::Q_BYTES;
    unsigned long long* qbar = reinterpret_cast<unsigned long long*>(stages + FA_STAGES * C::STAGE);
    unsigned long long* full = qbar + 1;
    unsigned long long* empty = full + FA_STAGES;

    const int h = QUANT ? blockIdx.x : blockIdx.y, tile = QUANT ? blockIdx.y : blockIdx.x;
    const int b = blockIdx.z, hk = h / (heads / kv_heads), q0 = tile * C::BQ;
    const int wg = threadIdx.x >> 7, ntiles = (nk + BKV - 1) / BKV;
    ring_barriers_init(qbar, full, empty, FA_STAGES);

    if (wg == 0) {
        if (threadIdx.x == 0) {
            mbarrier_arrive_expect_tx(qbar, C::Q_BYTES);
            for (int x = 0; x < D / 64; x++) tma_load_2d(qs + x * C::Q_BOX, tq, h * D + x * 64, b * nq + q0, qbar);
            for (int t = 0; t < ntiles; t++) {
                const int s = t % FA_STAGES;
                unsigned char* st = stages + s * C::STAGE;
                mbarrier_wait(&empty[s], ((t / FA_STAGES) & 1) ^ 1);  // the first round finds every stage empty
                mbarrier_arrive_expect_tx(&full[s], C::STAGE);
                for (int x = 0; x < D / 64; x++)
                    tma_load_2d(st + x * C::K_BOX, tk, hk * D + x * 64, b * nk + t * BKV, &full[s]);
                for (int x = 0; x < BKV / 64; x++)
                    tma_load_2d(st + C::STAGE_K + x * C::V_BOX, tv, t * BKV + x * 64, (b * kv_heads + hk) * D, &full[s]);
            }
        }
        if constexpr (QUANT) e4m3_rows_finish(e, out, b, tile, gridDim.y, q0, C::BQ, nq, heads, heads * D);
        return;
    }

    const int half = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const bool leader = (threadIdx.x & 127) == 0;
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {ATTN_NEG_INF, ATTN_NEG_INF}, l_r[2] = {0.f, 0.f};
    const unsigned char* q_half = qs + half * 64 * 128;  // this warpgroup's 64 rows: 8 swizzle atoms in
    mbarrier_wait(qbar, 0);

    // P's A fragments: those of tile t-1 are read by its P·V wgmmas until they retire during tile t.
    unsigned pf[BKV / 16][4];
    for (int t = 0; t < ntiles; t++) {
        const int s = t % FA_STAGES;
        const unsigned char* st = stages + s * C::STAGE;
        mbarrier_wait(&full[s], (t / FA_STAGES) & 1);

        float sc[NT][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const unsigned long long da = wgmma_desc_sw128(q_half + (kk / 4) * C::Q_BOX + (kk % 4) * 32);
            const unsigned long long db = wgmma_desc_sw128(st + (kk / 4) * C::K_BOX + (kk % 4) * 32);
            wgmma_s<BKV>(&sc[0][0], da, db, kk > 0);
        }
        wgmma_commit();
        if (t > 0) {
            // Tile t-1's P·V (issued before this S) has retired: O is settled, its stage goes back.
            wgmma_wait<1>();
            wgmma_fence_operand<D / 2>(&o[0][0]);
            wgmma_fence_operand<BKV / 4>(&pf[0][0]);
            if (leader) mbarrier_arrive(&empty[(t - 1) % FA_STAGES]);
        }
        wgmma_wait<0>();
        wgmma_fence_operand<BKV / 2>(&sc[0][0]);

        // Only the ragged last tile hides keys (past nk, or the next sequence's rows of K).
        const int k0 = t * BKV;
        scale_scores<NT>(sc, scale_log2, k0 + BKV > nk, k0, [&](int key, int) { return key < nk; });
        float alpha[2];
        online_softmax_tile<NT>(sc, m_r, l_r, alpha);
        rescale_rows<D / 8>(o, alpha);

        // O += P·V, left in flight while the next tile's S is issued.
#pragma unroll
        for (int kk = 0; kk < BKV / 16; kk++) p_fragment<NT>(sc, kk, pf[kk]);
        wgmma_fence_operand<D / 2>(&o[0][0]);
        wgmma_fence_operand<BKV / 4>(&pf[0][0]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BKV / 16; kk++) {
            const unsigned long long db = wgmma_desc_sw128(st + C::STAGE_K + (kk / 4) * C::V_BOX + (kk % 4) * 32);
            wgmma_pv<D>(&o[0][0], pf[kk], db);
        }
        wgmma_commit();
    }
    wgmma_wait<0>();
    wgmma_fence_operand<D / 2>(&o[0][0]);
    wgmma_fence_operand<BKV / 4>(&pf[0][0]);

    const float inv[2] = {row_inverse(l_r[0]), row_inverse(l_r[1])};
    const i64 q_stride = (i64)heads * D;
    bf16* ob = out + (i64)b * nq * q_stride + (i64)h * D + (lane & 3) * 2;
    const int row0 = q0 + half * 64 + warp * 16 + (lane >> 2);
    if constexpr (QUANT) {
        float row_max[2];
        store_rows_bf16<D / 8>(o, inv, ob, row0, nq, q_stride, row_max);
        quad_rows_max(e, b, nq, row0, row_max);
        e4m3_rows_finish(e, out, b, tile, gridDim.y, q0, C::BQ, nq, heads, heads * D);
    } else {
        store_rows_bf16<D / 8>(o, inv, ob, row0, nq, q_stride);
    }
}
#endif

// tq: tensor map of q as [B·Nq, H·D] with 64 x 128 boxes; tk: k as [B·Nk, Hkv·D], 64 x BKV boxes;
// tv: Vᵀ as [B·Hkv·D, nk_pad], 64 x D boxes (tensor_map.rs, row_major_128b).
extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)
    flash_attention_v4_d64_bf16(const __grid_constant__ TensorMap tq, const __grid_constant__ TensorMap tk,
                                const __grid_constant__ TensorMap tv, bf16* out, int nq, int nk, int heads, int kv_heads,
                                float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    flash_v4<64>(&tq, &tk, &tv, out, nq, nk, heads, kv_heads, scale_log2);
#else
    __trap();  // wgmma needs an sm_90a image: the launcher picks v3 elsewhere
#endif
}

extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)
    flash_attention_v4_d128_bf16(const __grid_constant__ TensorMap tq, const __grid_constant__ TensorMap tk,
                                 const __grid_constant__ TensorMap tv, bf16* out, int nq, int nk, int heads, int kv_heads,
                                 float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    flash_v4<128>(&tq, &tk, &tv, out, nq, nk, heads, kv_heads, scale_log2);
#else
    __trap();  // wgmma needs an sm_90a image: the launcher picks v3 elsewhere
#endif
}

// The same, the output also as the e4m3 rows of the FP8 linears that read it (e4m3_rows.cuh): grid
// (heads, query tiles, B), e.scratch zeroed.
extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)
    flash_attention_v4_e4m3out_d64_bf16(const __grid_constant__ TensorMap tq, const __grid_constant__ TensorMap tk,
                                        const __grid_constant__ TensorMap tv, bf16* out, int nq, int nk, int heads,
                                        int kv_heads, float scale_log2, E4m3Split e) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    flash_v4<64, true>(&tq, &tk, &tv, out, nq, nk, heads, kv_heads, scale_log2, e);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)
    flash_attention_v4_e4m3out_d128_bf16(const __grid_constant__ TensorMap tq, const __grid_constant__ TensorMap tk,
                                         const __grid_constant__ TensorMap tv, bf16* out, int nq, int nk, int heads,
                                         int kv_heads, float scale_log2, E4m3Split e) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    flash_v4<128, true>(&tq, &tk, &tv, out, nq, nk, heads, kv_heads, scale_log2, e);
#else
    __trap();
#endif
}

// vt [B, Hkv, D, nk_pad] = v [B, Nk, Hkv, D] transposed per (batch, kv head), keys nk..nk_pad-1 zero
// (the P·V operand of flash v4: zeros, not stale bytes, meet the zero probabilities of padded keys).
// 32 x 32 tiles through shared memory: block (32, 8), grid (nk_pad / 32, D / 32, B · Hkv).
extern "C" __global__ void __launch_bounds__(256) transpose_v_bf16(const bf16* __restrict__ v, bf16* __restrict__ vt, int nk,
                                                                    int nk_pad, int kv_heads, int d) {
    __shared__ bf16 tile[32][33];
    const int bh = blockIdx.z, b = bh / kv_heads, hk = bh % kv_heads;
    const int k0 = blockIdx.x * 32, c0 = blockIdx.y * 32, tx = threadIdx.x, ty = threadIdx.y;
    const i64 row_stride = (i64)kv_heads * d;
    const bf16* src = v + (i64)b * nk * row_stride + (i64)hk * d;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int key = k0 + ty + 8 * i;
        tile[ty + 8 * i][tx] = key < nk ? src[(i64)key * row_stride + c0 + tx] : __float2bfloat16(0.f);
    }
    __syncthreads();
    bf16* dst = vt + ((i64)bh * d + c0) * nk_pad + k0;
#pragma unroll
    for (int i = 0; i < 4; i++) dst[(i64)(ty + 8 * i) * nk_pad + tx] = tile[tx][ty + 8 * i];
}
