// Flash attention v3 for d = 64 and 128 (v2, flash_attention_d{64,128}_bf16 in attention.cu, stays as the
// reference and fallback). q [B, Nq, H, D], k/v [B, Nk, Hkv, D] (GQA: kv head h / (H/Hkv)),
// out [B, Nq, H, D]; the masked instantiation adds causal (key j <= query i) and right padding
// (j < valid_len[b]), the Qwen3 text encoder's mask.
//
// What changed from v2 (see docs/perf-log.md for the expected effect):
//   - 128-query blocks: 8 warps x 16 rows (v2: 64 queries, 4 warps), so each K/V tile copied to shared
//     memory serves twice the queries.
//   - K/V double-buffered with cp.async: the copy of tile t+1 is issued before the math on tile t, one
//     barrier per tile (v2 waited for each copy right after issuing it).
//   - The mask test is a template parameter: the unmasked kernels test keys only in the ragged last tile,
//     the masked ones only in tiles a warp's rows do not see whole (32-bit compares; v2 made 64-bit
//     compares on every score).
//   - Q lives in registers (A fragments), staged once through the K/V buffers; the shared memory holds
//     only the two K/V stages.
// Budget, chosen so two blocks (16 warps) fit one SM on sm_86/89/120 (100 KB shared per SM, 64K registers):
//   d = 64:  64-key tiles, 2 stages x (K + V) x 64 x 72 x 2 B = 36,864 B dynamic shared memory
//   d = 128: 32-key tiles, 2 stages x (K + V) x 32 x 136 x 2 B = 34,816 B (64-key tiles would need
//            69,632 B: one block per SM on those cards)
//   __launch_bounds__(256, 2) caps registers at 128 per thread (O 64 + Q 32 + scores 16 at d = 128).
// flash_attention_v3_e4m3out_d{64,128}_bf16 (unmasked) also write the output as the e4m3 rows of the FP8
// linears that read it (the double block's output projections, e4m3_rows.cuh), grid heads first.
// ptxas (NVRTC 12.9, scripts/ptxas_report.py), registers / stack / spill stores / spill loads in bytes:
//   d 64:  128/0/0/0 on sm_80/86/89/90a; 128/24/24/32 on sm_120
//   d 128: 128/32/48/36 on sm_80/86/89/90a; 128/48/68/56 on sm_120 (masked: 48/64/52)
//   e4m3out: d 64 as d 64; d 128 128/32/52/36 on sm_89/90a, 128/24/36/36 on sm_120
//   Without the 2-block cap d 128 takes 178 registers and no spills: the spills (a few values, to L1) were
//   judged cheaper than halving the resident warps; __launch_bounds__(256, 1) is the alternative if a GPU
//   run says otherwise (docs/perf-log.md).
#include "e4m3_rows.cuh"
#include "softmax_tile.cuh"

template <int D>
struct V3Cfg {
    static constexpr int BQ = 128, THREADS = 256;
    static constexpr int BKV = D == 64 ? 64 : 32;
    static constexpr int LD = D + 8;  // padded bf16 row: conflict-free ldmatrix
    static constexpr int STAGE = 2 * BKV * LD;  // elements of one K + V stage
    static constexpr int SMEM = 2 * STAGE * 2;  // bytes
    static_assert(BQ * LD <= 2 * STAGE, "the Q tile is staged in the K/V buffers");
    static_assert((BKV * D / 8) % THREADS == 0, "whole K/V copy rounds");
};

// QUANT: the output also as the FP8 linears' e4m3 rows into `e` (e4m3_rows.cuh), the grid heads first
// ((heads, query tiles, B)); else (query tiles, heads, B).
template <int D, bool MASKED, bool QUANT = false>
__device__ __forceinline__ void flash_v3(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, bf16* __restrict__ out, int nq, int nk,
                                         int heads, int kv_heads, float scale_log2, int causal,
                                         const int* __restrict__ valid_len, const E4m3Split& e = E4m3Split{}) {
    using C = V3Cfg<D>;
    constexpr int BQ = C::BQ, BKV = C::BKV, LD = C::LD, NT = C::THREADS, NTILE = BKV / 8;
    bf16* smem = dynamic_smem<bf16>();

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = QUANT ? blockIdx.x : blockIdx.y, tile = QUANT ? blockIdx.y : blockIdx.x;
    const int b = blockIdx.z, hk = h / (heads / kv_heads), q0 = tile * BQ;
    const i64 q_stride = (i64)heads * D, kv_stride = (i64)kv_heads * D;
    const bf16* qb = q + (i64)b * nq * q_stride + (i64)h * D;
    const bf16* kb = k + (i64)b * nk * kv_stride + (i64)hk * D;
    const bf16* vb = v + (i64)b * nk * kv_stride + (i64)hk * D;

    // Keys past kv_lim are hidden for every row; causal also hides keys past the block's last query.
    int kv_lim = nk;
    if (MASKED) {
        if (valid_len) kv_lim = min(kv_lim, valid_len[b]);
        if (causal) kv_lim = min(kv_lim, q0 + BQ);
    }

    // Q: staged in the K/V buffers, then A fragments of this warp's 16 rows.
    for (int c = tid; c < BQ * D / 8; c += NT) {
        int row = c / (D / 8), col = (c % (D / 8)) * 8;
        bool ok = q0 + row < nq;
        cp_async16(&smem[row * LD + col], ok ? (const void*)(qb + (i64)(q0 + row) * q_stride + col) : (const void*)q,
                   ok ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        ldmatrix_x4(qf[kk], &smem[(warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8]);
    __syncthreads();

    // Tile t's K and V rows into stage t & 1 (keys past nk zero-filled), as one commit group. Each thread
    // copies the same column of CHUNKS rows RSTEP apart in every tile.
    constexpr int CHUNKS = BKV * D / 8 / NT, RSTEP = NT / (D / 8);
    const int lrow = tid / (D / 8), lcol = (tid % (D / 8)) * 8;
    const i64 loff = (i64)lrow * kv_stride + lcol;
    auto load_tile = [&](int t) {
        bf16* Ks = smem + (t & 1) * C::STAGE + lrow * LD + lcol;
        const int k0 = t * BKV;
        const i64 off = loff + (i64)k0 * kv_stride;
#pragma unroll
        for (int i = 0; i < CHUNKS; i++) {
            bool ok = k0 + lrow + i * RSTEP < nk;
            i64 o2 = off + (i64)i * RSTEP * kv_stride;
            cp_async16(Ks + i * RSTEP * LD, ok ? (const void*)(kb + o2) : (const void*)k, ok ? 16 : 0);
            cp_async16(Ks + BKV * LD + i * RSTEP * LD, ok ? (const void*)(vb + o2) : (const void*)v, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {ATTN_NEG_INF, ATTN_NEG_INF}, l_r[2] = {0.f, 0.f};
    const int row0 = q0 + warp * 16 + (lane >> 2);  // this thread's rows: row0, row0 + 8

    const int ntiles = (kv_lim + BKV - 1) / BKV;
    if (ntiles > 0) load_tile(0);
    for (int t = 0; t < ntiles; t++) {
        cp_async_wait<0>();  // tile t
        __syncthreads();     // tile t visible; every warp is done with tile t-1, whose stage is refilled next
        if (t + 1 < ntiles) load_tile(t + 1);
        const bf16* Ks = smem + (t & 1) * C::STAGE;
        const bf16* Vs = Ks + BKV * LD;
        const int k0 = t * BKV;

        float s[NTILE][4];
#pragma unroll
        for (int j = 0; j < NTILE; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int nb = 0; nb < NTILE / 2; nb++) {
                unsigned r[4];
                ldmatrix_x4(r, &Ks[(nb * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8]);
                mma_bf16_16816(s[2 * nb], qf[kk], r[0], r[1]);
                mma_bf16_16816(s[2 * nb + 1], qf[kk], r[2], r[3]);
            }

        // Per-score test only where some key of the tile is hidden from some row of this warp.
        bool partial = k0 + BKV > kv_lim;
        if (MASKED && causal) partial = partial || k0 + BKV - 1 > q0 + warp * 16;
        scale_scores<NTILE>(s, scale_log2, partial, k0, [&](int key, int e) {
            return key < kv_lim && !(MASKED && causal && key > row0 + (e >> 1) * 8);
        });

        float alpha[2];
        online_softmax_tile<NTILE>(s, m_r, l_r, alpha);
        rescale_rows<D / 8>(o, alpha);

        // O += P V.
#pragma unroll
        for (int kk = 0; kk < BKV / 16; kk++) {
            unsigned a[4];
            p_fragment<NTILE>(s, kk, a);
#pragma unroll
            for (int db = 0; db < D / 16; db++) {
                unsigned r[4];
                ldmatrix_x4_trans(r, &Vs[(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + db * 16 + (lane >> 4) * 8]);
                mma_bf16_16816(o[2 * db], a, r[0], r[1]);
                mma_bf16_16816(o[2 * db + 1], a, r[2], r[3]);
            }
        }
    }

    const float inv[2] = {row_inverse(l_r[0]), row_inverse(l_r[1])};
    bf16* ob = out + (i64)b * nq * q_stride + (i64)h * D + (lane & 3) * 2;
    if constexpr (QUANT) {
        float row_max[2];
        store_rows_bf16<D / 8>(o, inv, ob, row0, nq, q_stride, row_max);
        quad_rows_max(e, b, nq, row0, row_max);
        e4m3_rows_finish(e, out, b, tile, gridDim.y, q0, BQ, nq, heads, heads * D);
    } else {
        store_rows_bf16<D / 8>(o, inv, ob, row0, nq, q_stride);
    }
}

extern "C" __global__ void __launch_bounds__(256, 2)
    flash_attention_v3_d64_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk, int heads,
                                int kv_heads, float scale_log2, int causal, const int* valid_len) {
    flash_v3<64, false>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    flash_attention_v3_d64_masked_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk,
                                       int heads, int kv_heads, float scale_log2, int causal, const int* valid_len) {
    flash_v3<64, true>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    flash_attention_v3_d128_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk, int heads,
                                 int kv_heads, float scale_log2, int causal, const int* valid_len) {
    flash_v3<128, false>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    flash_attention_v3_d128_masked_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk,
                                        int heads, int kv_heads, float scale_log2, int causal, const int* valid_len) {
    flash_v3<128, true>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len);
}

// The unmasked kernels, the output also as the e4m3 rows of the FP8 linears that read it (e4m3_rows.cuh):
// grid (heads, query tiles, B), e.scratch zeroed.
extern "C" __global__ void __launch_bounds__(256, 2)
    flash_attention_v3_e4m3out_d64_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk,
                                        int heads, int kv_heads, float scale_log2, int causal, const int* valid_len,
                                        E4m3Split e) {
    flash_v3<64, false, true>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len, e);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    flash_attention_v3_e4m3out_d128_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk,
                                         int heads, int kv_heads, float scale_log2, int causal, const int* valid_len,
                                         E4m3Split e) {
    flash_v3<128, false, true>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2, causal, valid_len, e);
}
