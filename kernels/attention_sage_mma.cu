// Sage attention on tensor cores (v2 of attention_sage_rowwise_bf16 in quantized.cu, which stays as the
// reference). Same numerics as the CPU emulation (src/backend/cpu/quantized.rs): K smoothed by its token
// mean, Q and K int8 with one scale per 64-token block, exact integer scores (mma.sync m16n8k32 s8 -> s32,
// sm_80+), online softmax in f32 over 64-key tiles (exp2 in the log2 domain), P scaled by 448 and rounded to e4m3,
// V smoothed by its token mean and e4m3 per channel, P·V accumulated in f32:
//   attention_sage_mma_d{64,128}: P·V on mma.sync m16n8k32 e4m3 (sm_89+).
//   attention_sage_mma_e4m3out_d{64,128}: the same, the output also as the e4m3 rows (codes and per-token
//     scales) of the FP8 linears that read it (the double block's output projections, e4m3_rows.cuh):
//     grid (heads, query tiles, B), the block completing a query tile's heads quantizes the tile.
//   attention_sage_mma_bf16pv_d{64,128}: for sm_80/86 (no e4m3 tensor cores). Every e4m3 value is a bf16
//     value, so P and V rounded to e4m3 and held as bf16 give the same products on mma.sync m16n8k16 bf16:
//     each e4m3 m16n8k32 step becomes two bf16 steps over the same 32 key slots (thread t's slots 4t..4t+3
//     of each half, read as its k = 2t, 2t+1, 2t+8, 2t+9; A and B agree, so the sum is the same). Vᵀ holds
//     the e4m3-rounded values as bf16 (sage_quantize_vt_e4m3_as_bf16), read with 8-byte shared loads.
//
// Pre-passes (besides the K/V statistics of quantized.cu):
//   sage_quantize_int8_block_bf16 (v2): Q or K to int8 codes in their own layout [B, N, H, D] with the
//     64-token block scales, one pass; v1 (sage_block_absmax_bf16, then sage_quantize_int8_bf16) stays as
//     its reference, run by the selftest's "v1-quant" cases.
//   sage_norm_rope_int8_bf16 (v3): the same codes and scales straight from the raw q/k projection, fused into the
//     QK RMSNorm + RoPE (attention_sage_normed); its reference is rms_norm_rope_bf16 followed by v2.
//   sage_quantize_vt_e4m3_bf16: V to e4m3 codes transposed per (batch, kv head) to [D, Nk rounded up to 64],
//     keys permuted inside each group of 32 so that the P accumulators of the Q·Kᵀ mma are already the
//     A fragment of the e4m3 mma (slot 16h + 4c + 2t + u holds key 16h + 8t + 2c + u: thread c of a quad
//     holds keys 2c, 2c+1 of each 8-key tile; the A fragment wants 4 consecutive k slots per thread).
//
// Main kernel: 128 queries (two Q scale blocks) x 8 warps of 16 rows, 64-key tiles (one K scale block
// each), K and Vᵀ tiles double-buffered with cp.async (the next tile's copy issued before the math on this
// one): each K/Vᵀ tile staged once serves 128 queries (64 before session 14). Shared memory (rows padded
// by 16 bytes: conflict-free ldmatrix, as the GEMM tile): Q 128 x (D+16) B + 2 stages x (K 64 x (D+16) B +
// Vᵀ D x 80 B): 57,344 B at d = 128, 30,720 B at d = 64; bf16 P·V (Vᵀ D x 144 B): 73,728 B / 38,912 B
// (sage_mma_smem_bytes in sage.rs), one block of 8 warps per SM on sm_86 where the 64-query block of
// 64,512 B gave 4.
// ptxas (NVRTC 12.9, scripts/ptxas_report.py), registers at d = 128 / d = 64, no stack or spills anywhere:
// e4m3 P·V sm_89 170/124, sm_90a 195/203, sm_120 185/160 (8 warps a block, one block per SM: as many warps
// as the two 4-warp blocks of 64 queries before on sm_89); bf16 P·V 166–185/117–159. The cp.async loops
// stay rolled and d = 64 is bounded to one block per SM: otherwise ptxas spilled (sm_90a d 128: 120 bytes,
// sm_120 d 64: 12). The quantize passes 28–38. (sm_80/86 images hold a trap in the e4m3 kernels.)
// e4m3out: sm_89 174/123, sm_90a 196/203, sm_120 223/175, no stack or spills, 16 B of static shared memory.
#include <cuda_fp8.h>
#include "qk_norm.cuh"
#include "sage_tile.cuh"
#include "softmax_tile.cuh"

#define SAGE_TILE 64

__device__ __forceinline__ float sage_int8_round(float x) { return fminf(fmaxf(rintf(x), -127.f), 127.f); }

// Q (mean = null) or K (mean per (batch, head, channel)) to int8 codes: x [B, N, H, D], block_absmax per
// (batch, head, 64-token block).
extern "C" __global__ void sage_quantize_int8_bf16(const bf16* x, const float* mean, const float* block_absmax,
                                                   signed char* out, int n, int heads, int d, i64 total) {
    const int blocks = (n + SAGE_TILE - 1) / SAGE_TILE;
    GRID_STRIDE(i, total) {
        int c = (int)(i % d);
        i64 row = i / d;  // (b * n + j) * heads + h
        int h = (int)(row % heads);
        i64 bj = row / heads;
        int j = (int)(bj % n), b = (int)(bj / n);
        i64 bh = (i64)b * heads + h;
        float s = block_absmax[bh * blocks + j / SAGE_TILE] / 127.f;
        float inv = s > 0.f ? 1.f / s : 0.f;
        float val = to_f(x[i]) - (mean ? mean[bh * d + c] : 0.f);
        out[i] = (signed char)(int)sage_int8_round(val * inv);
    }
}

// v2 of sage_block_absmax_bf16 + sage_quantize_int8_bf16 (quantized.cu, above), the tensor-core path's Q and K
// pre-pass: one CTA per (64-token block, batch * head) finds the block's |x - mean|max, writes it, and writes the
// block's codes, so the block is read from DRAM once (its second read hits L1/L2: 16 KB at d = 128) and with one
// launch instead of two; 8 channels per 16-byte load, 8 codes per 8-byte store. Same arithmetic as v1, so the
// same bits. d a multiple of 8. Grid (blocks, batch * heads), 256 threads.
extern "C" __global__ void sage_quantize_int8_block_bf16(const bf16* x, const float* mean, float* block_absmax,
                                                         signed char* out, int n, int heads, int d) {
    __shared__ float scratch[32];
    const int blk = blockIdx.x, bh = blockIdx.y;
    const int b = bh / heads, h = bh % heads;
    const int rows = min(SAGE_TILE, n - blk * SAGE_TILE), groups = d / 8;
    const float* mean_bh = mean ? mean + (i64)bh * d : nullptr;
    // Element offset of group i of the block (row i / groups, channels 8 * (i % groups) ..).
    auto offset = [&](int i, int& c) {
        c = (i % groups) * 8;
        return (((i64)b * n + blk * SAGE_TILE + i / groups) * heads + h) * d + c;
    };
    float m = 0.f;
    for (int i = threadIdx.x; i < rows * groups; i += blockDim.x) {
        int c;
        float v[8];
        load_bf16x8(x + offset(i, c), v);
#pragma unroll
        for (int e = 0; e < 8; e++) m = fmaxf(m, fabsf(v[e] - (mean_bh ? mean_bh[c + e] : 0.f)));
    }
    m = block_max(m, scratch);
    if (threadIdx.x == 0) block_absmax[(i64)bh * gridDim.x + blk] = m;
    const float s = m / 127.f, inv = s > 0.f ? 1.f / s : 0.f;
    for (int i = threadIdx.x; i < rows * groups; i += blockDim.x) {
        int c;
        const i64 at = offset(i, c);
        float v[8];
        load_bf16x8(x + at, v);
        unsigned packed[2] = {0u, 0u};
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int code = (int)sage_int8_round((v[e] - (mean_bh ? mean_bh[c + e] : 0.f)) * inv);
            packed[e / 4] |= (unsigned)(code & 0xff) << (8 * (e % 4));
        }
        *reinterpret_cast<uint2*>(out + at) = make_uint2(packed[0], packed[1]);
    }
}

// v3 of the Q/K pre-pass: the quantisation fused into the QK RMSNorm + RoPE that produces q and k. One CTA per
// (64-token block, batch * head) norms and rotates the block's rows of the raw projection, as rms_norm_rope_bf16 does
// (same arithmetic: the normed value rounded to bf16 before the rotation, the rotated one rounded to bf16), keeps them
// in shared memory, then either adds each channel's f64 sum into sums[bh][0][c] (sums != null: K's smoothing mean,
// needed before K's codes exist) or writes the block's |x - mean|max and its codes as sage_quantize_int8_block_bf16
// does (Q with mean null, K with its mean). The tokens are the concatenation of up to two parts (the double block's
// text and image streams), part p [B, L_p, H, d] with tokens ld_p apart (batches ld_p * L_p apart) and its own norm
// weight; token t of the joint sequence takes table row t. So q and k are read from the projection once (K twice:
// sums, then codes) and never written in bf16. Grid (blocks, batch * heads), 256 threads; d 64 or 128.
#define SAGE_NORM_MAX_D 128
extern "C" __global__ void __launch_bounds__(256)
    sage_norm_rope_int8_bf16(const bf16* x0, i64 ld0, const bf16* w0, int len0, const bf16* x1, i64 ld1, const bf16* w1,
                             const float* cos_t, const float* sin_t, int n, int heads, int d, float eps, int interleaved,
                             const float* mean, double* sums, float* block_absmax, signed char* out) {
    __shared__ bf16 tile[SAGE_TILE * SAGE_NORM_MAX_D];
    __shared__ float scratch[32];
    const int blk = blockIdx.x, bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int rows = min(SAGE_TILE, n - blk * SAGE_TILE), half = d / 2, lane = threadIdx.x & 31;
    const float* mean_bh = mean ? mean + (i64)bh * d : nullptr;
    float m = 0.f;
    for (int j = threadIdx.x >> 5; j < rows; j += blockDim.x >> 5) {
        const int t = blk * SAGE_TILE + j, second = t >= len0;
        const int tl = second ? t - len0 : t, len = second ? n - len0 : len0;
        const i64 ld = second ? ld1 : ld0;
        const bf16* w = second ? w1 : w0;
        const bf16* xr = (second ? x1 : x0) + ((i64)b * len + tl) * ld + (i64)h * d;
        const float inv = qk_rms_inverse(xr, d, eps);
        for (int p = lane; p < half; p += 32) {
            int i0, i1;
            rope_pair(p, half, interleaved, i0, i1);
            const float a = qk_normed(xr, w, inv, i0), c0 = qk_normed(xr, w, inv, i1);
            const float c = cos_t[(i64)t * half + p], sn = sin_t[(i64)t * half + p];
            const bf16 r0 = to_bf(a * c - c0 * sn), r1 = to_bf(c0 * c + a * sn);
            tile[j * d + i0] = r0;
            tile[j * d + i1] = r1;
            m = fmaxf(m, fabsf(to_f(r0) - (mean_bh ? mean_bh[i0] : 0.f)));
            m = fmaxf(m, fabsf(to_f(r1) - (mean_bh ? mean_bh[i1] : 0.f)));
        }
    }
    __syncthreads();
    if (sums) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            double s = 0.0;
            for (int j = 0; j < rows; j++) s += to_f(tile[j * d + c]);
            atomicAdd(&sums[(i64)bh * 2 * d + c], s);
        }
        return;
    }
    m = block_max(m, scratch);
    if (threadIdx.x == 0) block_absmax[(i64)bh * gridDim.x + blk] = m;
    const float sc = m / 127.f, inv = sc > 0.f ? 1.f / sc : 0.f;
    const int groups = d / 8;
    for (int i = threadIdx.x; i < rows * groups; i += blockDim.x) {
        const int j = i / groups, c = (i % groups) * 8;
        unsigned packed[2] = {0u, 0u};
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int code = (int)sage_int8_round((to_f(tile[j * d + c + e]) - (mean_bh ? mean_bh[c + e] : 0.f)) * inv);
            packed[e / 4] |= (unsigned)(code & 0xff) << (8 * (e % 4));
        }
        const i64 at = (((i64)b * n + blk * SAGE_TILE + j) * heads + h) * d + c;
        *reinterpret_cast<uint2*>(out + at) = make_uint2(packed[0], packed[1]);
    }
}

// V [B, Nk, Hkv, D] (tokens `ld` elements apart) to e4m3 vt [B * Hkv, D, nk_pad] (key order permuted per 32,
// zeros past nk), as codes (T = unsigned char) or as their bf16 values (T = bf16).
template <typename T>
__device__ __forceinline__ void sage_quantize_vt(const bf16* v, const float* v_mean, const float* v_absmax, T* vt,
                                                 int nk, int nk_pad, int kv_heads, int d, i64 ld, i64 total) {
    GRID_STRIDE(i, total) {
        int slot = (int)(i % nk_pad);
        i64 rest = i / nk_pad;
        int c = (int)(rest % d);
        i64 bh = rest / d;
        int b = (int)(bh / kv_heads), h = (int)(bh % kv_heads);
        int s = slot & 31;  // slot 16h + 4c + 2t + u <- key 16h + 8t + 2c + u
        int key = (slot & ~31) + (s & 16) + ((s >> 1) & 1) * 8 + ((s >> 2) & 3) * 2 + (s & 1);
        unsigned char code = 0;
        if (key < nk) {
            float sc = v_absmax[bh * d + c] / 448.f;
            float inv = sc > 0.f ? 1.f / sc : 0.f;
            float val = (to_f(v[((i64)b * nk + key) * ld + (i64)h * d + c]) - v_mean[bh * d + c]) * inv;
            __nv_fp8_e4m3 q(val);
            code = q.__x;
        }
        if constexpr (sizeof(T) == 1) {
            vt[i] = code;
        } else {
            __nv_fp8_e4m3 q;
            q.__x = code;
            vt[i] = to_bf((float)q);
        }
    }
}

extern "C" __global__ void sage_quantize_vt_e4m3_bf16(const bf16* v, const float* v_mean, const float* v_absmax,
                                                      unsigned char* vt, int nk, int nk_pad, int kv_heads, int d,
                                                      i64 ld, i64 total) {
    sage_quantize_vt(v, v_mean, v_absmax, vt, nk, nk_pad, kv_heads, d, ld, total);
}

extern "C" __global__ void sage_quantize_vt_e4m3_as_bf16(const bf16* v, const float* v_mean, const float* v_absmax,
                                                         bf16* vt, int nk, int nk_pad, int kv_heads, int d,
                                                         i64 ld, i64 total) {
    sage_quantize_vt(v, v_mean, v_absmax, vt, nk, nk_pad, kv_heads, d, ld, total);
}

// x rounded to e4m3 (saturating, as the codes), as a float: exact in bf16.
__device__ __forceinline__ float e4m3_round(float x) { return (float)__nv_fp8_e4m3(x); }

// E4M3_PV: P·V on e4m3 tensor cores (vt holds codes); else on bf16 ones (vt holds bf16 values).
// QUANT: the output also as the FP8 linears' e4m3 rows into `e` (e4m3_rows.cuh), the grid heads
// first ((heads, query tiles, B)); else (query tiles, heads, B).
template <int D, bool E4M3_PV, bool QUANT>
__device__ __forceinline__ void sage_mma(const signed char* __restrict__ qc, const signed char* __restrict__ kc,
                                         const unsigned char* __restrict__ vt, bf16* __restrict__ out, int nq, int nk,
                                         int nk_pad, int heads, int kv_heads, float scale, int causal,
                                         const int* __restrict__ valid_len, const float* __restrict__ q_absmax,
                                         const float* __restrict__ k_absmax, const float* __restrict__ v_mean,
                                         const float* __restrict__ v_absmax, const E4m3Split& e) {
    constexpr int VB = E4M3_PV ? 1 : 2;  // bytes per Vᵀ value
    constexpr int BQ = 2 * SAGE_TILE, THREADS = 2 * BQ;  // 4 warps per Q scale block of 64
    constexpr int BKV = SAGE_TILE, LDQ = D + 16, LDV = BKV * VB + 16;
    constexpr int KBYTES = BKV * LDQ, STAGE = KBYTES + D * LDV;
    unsigned char* smem = dynamic_smem<unsigned char>();
    unsigned char* Qs = smem;
    unsigned char* stages = smem + BQ * LDQ;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = QUANT ? blockIdx.x : blockIdx.y, tile = QUANT ? blockIdx.y : blockIdx.x;
    const int b = blockIdx.z, hk = h / (heads / kv_heads), q0 = tile * BQ;
    const i64 q_stride = (i64)heads * D, kv_stride = (i64)kv_heads * D;
    const i64 bhk = (i64)b * kv_heads + hk;
    const signed char* qb = qc + (i64)b * nq * q_stride + (i64)h * D;
    const signed char* kb = kc + (i64)b * nk * kv_stride + (i64)hk * D;
    const unsigned char* vb = vt + bhk * D * nk_pad * VB;
    const int q_blocks = (nq + SAGE_TILE - 1) / SAGE_TILE, k_blocks = (nk + SAGE_TILE - 1) / SAGE_TILE;
    // This warp's Q scale block (none past nq: its rows are not stored).
    const int q_blk = q0 / SAGE_TILE + warp / 4;
    const float sq = q_blk < q_blocks ? q_absmax[((i64)b * heads + h) * q_blocks + q_blk] / 127.f : 0.f;

    int kend = nk;
    if (causal) {
        if (valid_len) kend = min(kend, valid_len[b]);
        kend = min(kend, q0 + BQ);
    }

#pragma unroll 1
    for (int c = tid; c < BQ * D / 16; c += THREADS) {
        int row = c / (D / 16), col = (c % (D / 16)) * 16;
        bool ok = q0 + row < nq;
        cp_async16(&Qs[row * LDQ + col], ok ? (const void*)(qb + (i64)(q0 + row) * q_stride + col) : (const void*)qc,
                   ok ? 16 : 0);
    }
    cp_async_commit();
    auto load_tile = [&](int t) {
        unsigned char* Ks = stages + (t & 1) * STAGE;
        unsigned char* Vs = Ks + KBYTES;
        const int k0 = t * BKV;
#pragma unroll 1
        for (int c = tid; c < BKV * D / 16; c += THREADS) {
            int row = c / (D / 16), col = (c % (D / 16)) * 16;
            bool ok = k0 + row < nk;
            cp_async16(&Ks[row * LDQ + col], ok ? (const void*)(kb + (i64)(k0 + row) * kv_stride + col) : (const void*)kc,
                       ok ? 16 : 0);
        }
#pragma unroll 1
        for (int c = tid; c < D * BKV * VB / 16; c += THREADS) {  // Vᵀ rows: always inside nk_pad
            int row = c / (BKV * VB / 16), col = (c % (BKV * VB / 16)) * 16;
            cp_async16(&Vs[row * LDV + col], vb + ((i64)row * nk_pad + k0) * VB + col, 16);
        }
        cp_async_commit();
    };
    const int ntiles = (kend + BKV - 1) / BKV;
    if (ntiles > 0) load_tile(0);
    cp_async_wait<0>();
    __syncthreads();
    unsigned qf[D / 32][4];
#pragma unroll
    for (int kk = 0; kk < D / 32; kk++)
        ldmatrix_x4(qf[kk], &Qs[(warp * 16 + (lane & 15)) * LDQ + kk * 32 + (lane >> 4) * 16]);

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_r[2] = {NEG_INFINITY_F, NEG_INFINITY_F}, l_r[2] = {0.f, 0.f};
    const int row0 = q0 + warp * 16 + (lane >> 2);
    const i64 valid = valid_len ? valid_len[b] : nk;

    for (int t = 0; t < ntiles; t++) {
        if (t > 0) {
            cp_async_wait<0>();
            __syncthreads();  // tile t visible; every warp done with tile t-1
        }
        if (t + 1 < ntiles) load_tile(t + 1);
        const unsigned char* Ks = stages + (t & 1) * STAGE;
        const unsigned char* Vs = Ks + KBYTES;
        const int k0 = t * BKV;
        const float sk = k_absmax[bhk * k_blocks + t] / 127.f;

        int si[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) si[j][0] = si[j][1] = si[j][2] = si[j][3] = 0;
#pragma unroll
        for (int kk = 0; kk < D / 32; kk++)
#pragma unroll
            for (int nb = 0; nb < 4; nb++) {
                unsigned r[4];
                ldmatrix_x4(r, &Ks[(nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDQ + kk * 32 + ((lane >> 3) & 1) * 16]);
                mma_s8_16832(si[2 * nb], qf[kk], r[0], r[1]);
                mma_s8_16832(si[2 * nb + 1], qf[kk], r[2], r[3]);
            }

        // Scores as the emulation computes them; hidden keys -inf. Online softmax (sage_tile.cuh).
        float s[8][4], alpha[2];
        sage_softmax_tile<8>(si, s, sq * sk, scale, k0, m_r, l_r, alpha, [&](int key, int e) {
            return key < nk && (!causal || (key <= row0 + (e >> 1) * 8 && key < valid));
        });
        rescale_rows<D / 8>(o, alpha);

        // O += P Vᵀ: P's accumulators are the e4m3 A fragment in the permuted key order of Vᵀ.
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            if constexpr (E4M3_PV) {
                unsigned a[4];
                sage_p_fragment_e4m3<8>(s, kk, a);
#pragma unroll
                for (int nb = 0; nb < D / 16; nb++) {
                    unsigned r[4];
                    ldmatrix_x4(r,
                                &Vs[(nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDV + kk * 32 + ((lane >> 3) & 1) * 16]);
                    mma_e4m3_16832(o[2 * nb], a, r[0], r[1]);
                    mma_e4m3_16832(o[2 * nb + 1], a, r[2], r[3]);
                }
            } else {
                // The same 32 slots as two bf16 k16 steps: slots 4t..4t+3 of each half are this
                // thread's k = 2t, 2t+1 (first pair) and 2t+8, 2t+9 (second pair).
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const float* p0 = s[4 * kk + 2 * hf];
                    const float* p1 = s[4 * kk + 2 * hf + 1];
                    const unsigned a[4] = {pack_bf16x2(e4m3_round(p0[0]), e4m3_round(p0[1])),
                                           pack_bf16x2(e4m3_round(p0[2]), e4m3_round(p0[3])),
                                           pack_bf16x2(e4m3_round(p1[0]), e4m3_round(p1[1])),
                                           pack_bf16x2(e4m3_round(p1[2]), e4m3_round(p1[3]))};
                    const unsigned char* vcol = &Vs[(lane >> 2) * LDV + (kk * 32 + hf * 16 + 4 * (lane & 3)) * 2];
#pragma unroll
                    for (int nb = 0; nb < D / 8; nb++) {
                        uint2 bv = *reinterpret_cast<const uint2*>(vcol + nb * 8 * LDV);
                        mma_bf16_16816(o[nb], a, bv.x, bv.y);
                    }
                }
            }
        }
    }

    float row_max[2];
    sage_store_rows<D / 8>(o, l_r, v_mean + bhk * D, v_absmax + bhk * D, out + (i64)b * nq * q_stride + (i64)h * D, row0,
                           nq, q_stride, row_max);
    if constexpr (QUANT) {
        quad_rows_max(e, b, nq, row0, row_max);
        e4m3_rows_finish(e, out, b, tile, gridDim.y, q0, BQ, nq, heads, heads * D);
    }
}

// e: where the e4m3out kernels write the output's e4m3 rows (the others take it empty and ignore it).
#define SAGE_MMA_ARGS                                                                                           \
    const signed char *qc, const signed char *kc, const unsigned char *vt, bf16 *out, int nq, int nk, int nk_pad,  \
        int heads, int kv_heads, float scale, int causal, const int *valid_len, const float *q_absmax,            \
        const float *k_absmax, const float *v_mean, const float *v_absmax, E4m3Split e
#define SAGE_MMA_PASS \
    qc, kc, vt, out, nq, nk, nk_pad, heads, kv_heads, scale, causal, valid_len, q_absmax, k_absmax, v_mean, v_absmax

// e4m3 tensor cores need sm_89 or newer: older images hold a trap (the launcher picks the bf16 P·V kernels).
extern "C" __global__ void __launch_bounds__(256, 1) attention_sage_mma_d64(SAGE_MMA_ARGS) {
#if __CUDA_ARCH__ >= 890
    sage_mma<64, true, false>(SAGE_MMA_PASS, e);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(256) attention_sage_mma_d128(SAGE_MMA_ARGS) {
#if __CUDA_ARCH__ >= 890
    sage_mma<128, true, false>(SAGE_MMA_PASS, e);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(256, 1) attention_sage_mma_bf16pv_d64(SAGE_MMA_ARGS) {
    sage_mma<64, false, false>(SAGE_MMA_PASS, e);
}

extern "C" __global__ void __launch_bounds__(256) attention_sage_mma_bf16pv_d128(SAGE_MMA_ARGS) {
    sage_mma<128, false, false>(SAGE_MMA_PASS, e);
}

// The same, the output also as the e4m3 rows of the FP8 linears that read it (e4m3_rows.cuh): grid
// (heads, query tiles, B), e.scratch zeroed.
extern "C" __global__ void __launch_bounds__(256, 1) attention_sage_mma_e4m3out_d64(SAGE_MMA_ARGS) {
#if __CUDA_ARCH__ >= 890
    sage_mma<64, true, true>(SAGE_MMA_PASS, e);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(256) attention_sage_mma_e4m3out_d128(SAGE_MMA_ARGS) {
#if __CUDA_ARCH__ >= 890
    sage_mma<128, true, true>(SAGE_MMA_PASS, e);
#else
    __trap();
#endif
}
