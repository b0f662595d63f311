// Tensor-core attention for wide heads, d = 256, 384, 512 (the VAE mid-block: 1 head, d = 512, up to
// 16,384 tokens at 1024²), replacing attention_rowwise_bf16 (one warp per query, all of K and V reread per
// query) on those shapes. q [B, Nq, H, D], k/v [B, Nk, Hkv, D] (GQA), out [B, Nq, H, D]; no mask (the
// launcher sends masked calls to the row-wise kernel); any Nq, Nk (ragged tiles are zero-filled and their
// scores hidden).
//
// A 16-row fragment of O over all of d = 512 would be 256 f32 registers per thread, so d is split across
// warps: a block has RG row groups of 16 queries x DQ = D/128 warps, warp (rg, dq) owning columns
// [128·dq, 128·dq + 128). Per 32-key tile:
//   1. each warp computes the partial scores of its 16 rows over its 128 columns (Q fragments kept in
//      registers, K from shared memory; 8 k-steps x 4 mma.sync m16n8k16 per 8-key column),
//   2. the DQ partials go through shared memory (f32) and every warp of the row group sums them in the
//      same order, so all DQ warps see bit-identical scores, maxima and P,
//   3. online softmax in f32 (exp2, log2-domain scale), P packed to bf16 A fragments in registers,
//   4. O[:, slice] += P · V[:, slice] (ldmatrix.trans of V), the output accumulator kept per slice in
//      registers (16 x 128 f32 = 64 per thread).
// Pipeline with one K and one V buffer: V(t) is copied while the scores of tile t are computed, K(t+1)
// while the softmax and P·V of tile t run (three barriers per tile). A second K/V stage does not fit
// sm_86/89/120's 99 KB per block at d = 512.
//
// Budget per block (bf16 rows padded by 8 elements, f32 score rows by 8: conflict-free ldmatrix and
// float2 partial stores):
//   d = 512: 8 warps (2 x 4), 32 queries; K 33,280 B + V 33,280 B + partials 20,480 B = 87,040 B dynamic
//   d = 384: 6 warps (2 x 3), 32 queries; 25,088 + 25,088 + 15,360 = 65,536 B
//   d = 256: 8 warps (4 x 2), 64 queries; 16,896 + 16,896 + 20,480 = 54,272 B
// Registers per thread: O 64 + Q fragments 32 + scores 16 + softmax state 4 + addressing; one block per SM
// (8 warps) at d = 512. The Q tile is staged through the K/V buffers before the first K copy.
// ptxas (NVRTC 12.9, scripts/ptxas_report.py): d 512: 172 registers on sm_80/86/89/90a, 164 on sm_120; d 384:
// 171/168 (sm_90a)/166 (sm_120); d 256: 172/170/158; no stack, no spills, no static shared memory.
#include "softmax_tile.cuh"

template <int D>
struct WideCfg {
    static constexpr int DQ = D / 128;          // warps per row group, one per 128 columns of d
    static constexpr int RG = DQ == 2 ? 4 : 2;  // row groups of 16 queries
    static constexpr int THREADS = 32 * RG * DQ;
    static constexpr int BQ = 16 * RG, BKV = 32;
    static constexpr int LD = D + 8;     // bf16 row of Q/K/V in shared memory
    static constexpr int SLD = BKV + 8;  // f32 row of the partial scores
    static_assert(D % 128 == 0 && D <= 512, "d must be 256, 384 or 512");
    static_assert(BQ <= 2 * BKV, "the Q tile is staged in the K and V buffers");
};

template <int D>
__device__ __forceinline__ void attention_wide(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, bf16* __restrict__ out, int nq, int nk,
                                               int heads, int kv_heads, float scale_log2) {
    using C = WideCfg<D>;
    constexpr int BQ = C::BQ, BKV = C::BKV, LD = C::LD, SLD = C::SLD, DQ = C::DQ, NT = C::THREADS;
    bf16* Ks = dynamic_smem<bf16>();
    bf16* Vs = Ks + BKV * LD;
    float* Sp = reinterpret_cast<float*>(Vs + BKV * LD);  // [DQ][BQ][SLD] partial scores

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int rg = warp / DQ, dq = warp % DQ;
    const int h = blockIdx.y, b = blockIdx.z, hk = h / (heads / kv_heads);
    const int q0 = blockIdx.x * BQ;
    const i64 q_stride = (i64)heads * D, kv_stride = (i64)kv_heads * D;
    const bf16* qb = q + (i64)b * nq * q_stride + (i64)h * D;
    const bf16* kb = k + (i64)b * nk * kv_stride + (i64)hk * D;
    const bf16* vb = v + (i64)b * nk * kv_stride + (i64)hk * D;

    // rows x D from `src` (row stride `stride`, rows past `limit` zero-filled) into `dst`.
    auto copy_rows = [&](bf16* dst, const bf16* src, i64 stride, int row0, int rows, int limit) {
        for (int c = tid; c < rows * (D / 8); c += NT) {
            int row = c / (D / 8), col = (c % (D / 8)) * 8;
            bool ok = row0 + row < limit;
            cp_async16(&dst[row * LD + col], ok ? (const void*)(src + (i64)(row0 + row) * stride + col) : (const void*)src,
                       ok ? 16 : 0);
        }
        cp_async_commit();
    };

    // Q: staged in the K/V buffers, then A fragments of this warp's 16 rows x 128 columns.
    copy_rows(Ks, qb, q_stride, q0, BQ, nq);
    cp_async_wait<0>();
    __syncthreads();
    unsigned qf[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
        ldmatrix_x4(qf[kk], &Ks[(rg * 16 + (lane & 15)) * LD + dq * 128 + kk * 16 + (lane >> 4) * 8]);
    __syncthreads();

    float o[16][4];
#pragma unroll
    for (int i = 0; i < 16; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {ATTN_NEG_INF, ATTN_NEG_INF}, l_r[2] = {0.f, 0.f};
    float* my_partial = Sp + (dq * BQ + rg * 16 + (lane >> 2)) * SLD + (lane & 3) * 2;

    const int ntiles = (nk + BKV - 1) / BKV;
    if (ntiles > 0) copy_rows(Ks, kb, kv_stride, 0, BKV, nk);
    for (int t = 0; t < ntiles; t++) {
        const int k0 = t * BKV;
        cp_async_wait<0>();  // K(t)
        __syncthreads();     // K(t) visible; V and the partials free (tile t-1 done with them)
        copy_rows(Vs, vb, kv_stride, k0, BKV, nk);

        // 1. Partial scores: 16 rows x 32 keys over this warp's 128 columns.
        float s[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
#pragma unroll
            for (int nb = 0; nb < 2; nb++) {
                unsigned r[4];
                ldmatrix_x4(r, &Ks[(nb * 16 + (lane & 7) + (lane >> 4) * 8) * LD + dq * 128 + kk * 16 +
                                   ((lane >> 3) & 1) * 8]);
                mma_bf16_16816(s[2 * nb], qf[kk], r[0], r[1]);
                mma_bf16_16816(s[2 * nb + 1], qf[kk], r[2], r[3]);
            }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            *reinterpret_cast<float2*>(my_partial + j * 8) = float2{s[j][0], s[j][1]};
            *reinterpret_cast<float2*>(my_partial + 8 * SLD + j * 8) = float2{s[j][2], s[j][3]};
        }
        __syncthreads();  // partials visible; K free
        if (t + 1 < ntiles) copy_rows(Ks, kb, kv_stride, k0 + BKV, BKV, nk);

        // 2. Full scores: the DQ partials summed in a fixed order (identical in every warp of the group).
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                float2 acc = {0.f, 0.f};
#pragma unroll
                for (int p = 0; p < DQ; p++) {
                    float2 x = *reinterpret_cast<const float2*>(my_partial + (p - dq) * BQ * SLD + half * 8 * SLD + j * 8);
                    acc.x += x.x;
                    acc.y += x.y;
                }
                s[j][2 * half] = acc.x * scale_log2;
                s[j][2 * half + 1] = acc.y * scale_log2;
            }
        if (k0 + BKV > nk) {  // ragged last tile: its zero-filled keys are hidden
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (k0 + j * 8 + (lane & 3) * 2 + (e & 1) >= nk) s[j][e] = ATTN_NEG_INF;
        }

        // 3. Online softmax, rescale this warp's slice of O.
        float alpha[2];
        online_softmax_tile<4>(s, m_r, l_r, alpha);
#pragma unroll
        for (int i = 0; i < 16; i++) {
            o[i][0] *= alpha[0];
            o[i][1] *= alpha[0];
            o[i][2] *= alpha[1];
            o[i][3] *= alpha[1];
        }

        // 4. O[:, slice] += P V[:, slice].
        if (t + 1 < ntiles)
            cp_async_wait<1>();  // V(t); K(t+1) may still be in flight
        else
            cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            unsigned a[4];
            p_fragment<4>(s, kk, a);
#pragma unroll
            for (int db = 0; db < 8; db++) {
                unsigned r[4];
                ldmatrix_x4_trans(r, &Vs[(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dq * 128 + db * 16 +
                                         (lane >> 4) * 8]);
                mma_bf16_16816(o[2 * db], a, r[0], r[1]);
                mma_bf16_16816(o[2 * db + 1], a, r[2], r[3]);
            }
        }
    }

    const float inv[2] = {row_inverse(l_r[0]), row_inverse(l_r[1])};
    bf16* ob = out + (i64)b * nq * q_stride + (i64)h * D + dq * 128 + (lane & 3) * 2;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = q0 + rg * 16 + (lane >> 2) + half * 8;
        if (row < nq) {
#pragma unroll
            for (int i = 0; i < 16; i++)
                *reinterpret_cast<unsigned*>(ob + (i64)row * q_stride + i * 8) =
                    pack_bf16x2(o[i][2 * half] * inv[half], o[i][2 * half + 1] * inv[half]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    flash_attention_wide_d256_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk, int heads,
                                   int kv_heads, float scale_log2) {
    static_assert(WideCfg<256>::THREADS == 256, "launch bounds");
    attention_wide<256>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2);
}

extern "C" __global__ void __launch_bounds__(192)
    flash_attention_wide_d384_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk, int heads,
                                   int kv_heads, float scale_log2) {
    static_assert(WideCfg<384>::THREADS == 192, "launch bounds");
    attention_wide<384>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2);
}

extern "C" __global__ void __launch_bounds__(256)
    flash_attention_wide_d512_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int nq, int nk, int heads,
                                   int kv_heads, float scale_log2) {
    static_assert(WideCfg<512>::THREADS == 256, "launch bounds");
    attention_wide<512>(q, k, v, out, nq, nk, heads, kv_heads, scale_log2);
}
