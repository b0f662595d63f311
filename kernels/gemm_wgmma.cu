// v3 of the tensor-core GEMMs, for Hopper (sm_90a): C = A · Wᵀ (+ bias) with A [M, K] and
// W [N, K] row-major (K-major operands, both loaded by TMA), f32 accumulation, bf16 out.
//   gemm_wgmma_bf16:  bf16 A and W (v2: gemm_mma_bf16 in gemm.cu, mma.sync).
//   gemm_wgmma_gated_bf16: the same with the DiT's gated residual in the epilogue (v2:
//                     gemm_mma_gated_bf16).
//   gemm_wgmma_e4m3:  the FP8 W8A8 linear, e4m3 codes with per-token (A) and per-channel (W)
//                     scales applied in the epilogue (v2: gemm_w8a8_mma_e4m3 in quantized.cu).
//   gemm_wgmma_gated_e4m3: the same with the gated residual (v2: gemm_w8a8_mma_gated_e4m3).
// Persistent and warp-specialised: each block (three warpgroups, one per SM) walks the output tiles
// t = blockIdx.x, + gridDim.x, ... of 128 x 128 (or, the `_wide` kernels, 128 x 256: WgCfg).
// Warpgroup 0's first thread is the producer, issuing TMA loads of 128-byte K slices of A (128 rows)
// and W (128 or 256 rows) with the 128-byte swizzle into a ring of WgCfg::STAGES stages, straight
// on into the next tile's slices; warpgroups 1 and 2 consume, each computing 64 rows with four
// wgmma m64n128 (m64n256) per stage (32 bytes of K each). Each stage has a "full" mbarrier (the
// producer's expect_tx, completed by the copies' bytes) and an "empty" one (one arrival per
// consumer warpgroup once its wgmmas on the stage have retired); a consumer keeps one wgmma group
// in flight while the next stage's copies land. The epilogue is per warp: its 16 rows, 128 columns
// at a time, staged as bf16 in the warp's own shared buffer, then 16-byte stores, while the
// producer is already filling the ring for the next tile. Where whole tiles would leave SMs idle
// (fewer tiles than a few waves' worth, e.g. M = 512) the launcher asks for stream-K on narrow
// tiles: each block takes an equal range of the tiles' K slices instead (see StreamK). Ragged M, N
// and K are the TMA's zero fill plus a masked epilogue. Needs the row bytes of A and W to be a
// multiple of 16 (the tensor maps' strides).
#include <cuda_fp8.h>

#include "common.cuh"
#include "hopper.cuh"
#include "mma_tile.cuh"

#define WG_KB 128  // bytes of K per stage: one swizzled 128-byte row
#define WG_THREADS 384
#define WG_WARP_STAGE (16 * STAGE_LD * 2)  // a consumer warp's staged 16 x 128 bf16 rows
static_assert(TILE_M == 128 && TILE_N == 128, "the narrow wgmma tile is 128x128");

// The tile is 128 x BN: BN = 128 (the narrow kernels, with stream-K) or 256 (the wide ones, whole
// tiles only: each consumer warpgroup computes 64 x 256 with wgmma m64n256, twice the products per
// byte of W staged, its 128 accumulators paid for by setmaxnreg moving the producer warpgroup's
// registers to the consumers). Dynamic shared memory: 1 KB of slack to align the stages to the
// swizzle atom, the A (16 KB) and W (BN x 128 bytes) stages, the 8 consumer warps' epilogue
// buffers, then the full and empty barriers (smem_bytes in src/backend/cuda/gemm_wgmma.rs).
template <int BN>
struct WgCfg {
    static_assert(BN == 128 || BN == 256, "tiles are 128 or 256 wide");
    static constexpr int STAGES = BN == 128 ? 5 : 3;  // 3 x 48 KB: a fourth would pass 227 KB
    static constexpr int A_STAGE = TILE_M * WG_KB;
    static constexpr int W_STAGE = BN * WG_KB;
    static constexpr int ACC = BN / 2;  // accumulators per consumer thread
    static constexpr int SMEM = 1024 + STAGES * (A_STAGE + W_STAGE) + 8 * WG_WARP_STAGE + 2 * STAGES * 8;
    static_assert(SMEM <= 227 * 1024, "the most shared memory a block may opt into on sm_90");
};
// setmaxnreg of the wide kernels: 128 x 40 + 256 x 232 = 64,512 of the SM's 65,536 registers.
#define WG_PRODUCER_REGS 40
#define WG_CONSUMER_REGS 232

// Stream-K (the launcher's choice where whole tiles would leave SMs idle, e.g. M = 512): the
// tiles' K slices, numbered tile-major, are cut into gridDim.x equal ranges, one per block, so a
// tile may be computed in pieces by consecutive blocks. Each consumer warp of a piece writes its
// f32 partial to its block's slot (first or last tile of the block's range) and adds the piece's
// slice count to the tile's per-warp counter; the warp whose addition completes the count sums
// every piece, in block order (so the bits do not depend on which block finished last), runs the
// epilogue, and zeroes the counter for the next launch. Nobody waits for another block.
struct StreamK {
    float* partials;    // gridDim.x x 2 slots x 8 warps x 16 x 128 f32
    unsigned* counts;   // tiles x 8 warps, zero between launches
    i64 units;          // tiles x ktiles (units of work)
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
struct WgmmaRing {
    unsigned char* a;  // STAGES x 16 KB, each 1024-aligned
    unsigned char* w;  // STAGES x BN x 128 bytes
    bf16* staged;  // 8 x WG_WARP_STAGE
    unsigned long long* full;
    unsigned long long* empty;
};

template <int BN>
__device__ __forceinline__ WgmmaRing wgmma_ring() {
    using C = WgCfg<BN>;
    unsigned char* smem = dynamic_smem<unsigned char>();
    smem += (1024 - (__cvta_generic_to_shared(smem) & 1023)) & 1023;  // the swizzle atom's alignment
    WgmmaRing r;
    r.a = smem;
    r.w = smem + C::STAGES * C::A_STAGE;
    r.staged = reinterpret_cast<bf16*>(r.w + C::STAGES * C::W_STAGE);
    r.full = reinterpret_cast<unsigned long long*>(reinterpret_cast<unsigned char*>(r.staged) + 8 * WG_WARP_STAGE);
    r.empty = r.full + C::STAGES;
    return r;
}

// acc (+)= A · Wᵀ over one 32-byte K step of a 64 x BN warpgroup tile.
template <bool Fp8, int BN>
__device__ __forceinline__ void wgmma_step(float* acc, unsigned long long da, unsigned long long db) {
    if constexpr (Fp8 && BN == 128)
        wgmma_e4m3_m64n128k32(acc, da, db, 1);
    else if constexpr (Fp8)
        wgmma_e4m3_m64n256k32(acc, da, db, 1);
    else if constexpr (BN == 128)
        wgmma_bf16_m64n128k16(acc, da, db, 1);
    else
        wgmma_bf16_m64n256k16(acc, da, db, 1);
}

// One consumer thread's tile: acc, its BN / 2 accumulators of its warpgroup's 64 x BN half, from
// the ring's slices it ... it + ktiles - 1 (`it` counts slices over all of the block's tiles, so
// stage and phase carry on from tile to tile).
template <bool Fp8, int BN>
__device__ __forceinline__ void wgmma_consume(const WgmmaRing& r, int wg, int ktiles, unsigned it, float* acc) {
    using C = WgCfg<BN>;
#pragma unroll
    for (int i = 0; i < C::ACC; i++) acc[i] = 0.f;
    wgmma_fence_operand<C::ACC>(acc);
    const int a_half = (wg - 1) * 64 * WG_KB;  // this warpgroup's 64 rows: 8 swizzle atoms in
    const bool leader = (threadIdx.x & 127) == 0;
    for (int kt = 0; kt < ktiles; kt++, it++) {
        const int s = it % C::STAGES;
        mbarrier_wait(&r.full[s], (it / C::STAGES) & 1);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_KB / 32; kk++) {
            const unsigned long long da = wgmma_desc_sw128(r.a + s * C::A_STAGE + a_half + kk * 32);
            const unsigned long long db = wgmma_desc_sw128(r.w + s * C::W_STAGE + kk * 32);
            wgmma_step<Fp8, BN>(acc, da, db);
        }
        wgmma_commit();
        // The previous slice's wgmmas have retired: hand its stage back to the producer.
        wgmma_wait<1>();
        if (kt > 0 && leader) mbarrier_arrive(&r.empty[(it - 1) % C::STAGES]);
    }
    wgmma_wait<0>();
    wgmma_fence_operand<C::ACC>(acc);
    if (ktiles > 0 && leader) mbarrier_arrive(&r.empty[(it - 1) % C::STAGES]);
}

// The warp's epilogue: its 16 rows of the tile (accumulator 4i + j of lane l is row l/4 + 8(j >= 2)
// of them, column 8i + 2(l % 4) + (j & 1)) mapped by value(m, n, v), rounded to bf16 into the
// warp's buffer, then handed to store8(m, n, y, count) 8 columns at a time (as mma_tile_store8).
template <typename Value, typename Store8>
__device__ __forceinline__ void wgmma_warp_store8(bf16* stage, const float acc[64], i64 m0, i64 n0, int M, int N,
                                                  Value value, Store8 store8) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 16; i++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int r = (lane >> 2) + half * 8, c = i * 8 + (lane & 3) * 2;
            const i64 m = m0 + r, n = n0 + c;
            const bool row = m < M;
            const float lo = row && n < N ? value(m, n, acc[4 * i + 2 * half]) : 0.f;
            const float hi = row && n + 1 < N ? value(m, n + 1, acc[4 * i + 2 * half + 1]) : 0.f;
            *reinterpret_cast<unsigned*>(&stage[r * STAGE_LD + c]) = pack_bf16x2(lo, hi);
        }
    __syncwarp(FULL_MASK);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int chunk = lane + 32 * i, r = chunk >> 4, c = (chunk & 15) * 8;
        const i64 m = m0 + r, n = n0 + c;
        if (m < M && n < N) store8(m, n, *reinterpret_cast<const uint4*>(&stage[r * STAGE_LD + c]), (int)(N - n < 8 ? N - n : 8));
    }
    __syncwarp(FULL_MASK);  // the buffer is rewritten for the next tile
}

// First K slice (tile-major) of block b's range.
__device__ __forceinline__ i64 stream_k_start(const StreamK& sk, int b) { return sk.units * b / gridDim.x; }

// The block's work as (tile, first slice, end slice) pieces, in order: whole tiles
// blockIdx.x, + gridDim.x, ... without stream-K; its range of slices with it.
template <typename Piece>
__device__ __forceinline__ void for_each_piece(const StreamK* sk, int tiles, int ktiles, Piece piece) {
    if (!sk) {
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) piece(t, 0, ktiles);
        return;
    }
    const i64 end = stream_k_start(*sk, blockIdx.x + 1);
    for (i64 u = stream_k_start(*sk, blockIdx.x); u < end;) {
        const int t = (int)(u / ktiles), k0 = (int)(u % ktiles);
        const int k1 = (int)min((i64)ktiles, k0 + (end - u));
        piece(t, k0, k1);
        u += k1 - k0;
    }
}

// Block b's slot for its piece of tile t: 0 for the first tile of its range, 1 for the last.
__device__ __forceinline__ float4* stream_k_slot(const StreamK& sk, int b, int t, int ktiles, int warp) {
    const int which = stream_k_start(sk, b) / ktiles == t ? 0 : 1;
    return reinterpret_cast<float4*>(sk.partials) + ((i64)(b * 2 + which) * 8 + warp) * (16 * 128 / 4);
}

// A consumer warp's piece [k0, k1) of tile t: true when acc now holds the whole tile (this warp
// completed it), false when other pieces are still to come.
__device__ __forceinline__ bool stream_k_fixup(const StreamK& sk, float acc[64], int t, int k0, int k1, int ktiles,
                                               int warp) {
    const int lane = threadIdx.x & 31;
    float4* mine = stream_k_slot(sk, blockIdx.x, t, ktiles, warp);
#pragma unroll
    for (int j = 0; j < 16; j++)
        __stcg(&mine[j * 32 + lane], make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]));
    __threadfence();
    __syncwarp(FULL_MASK);
    unsigned* count = &sk.counts[(i64)t * 8 + warp];
    unsigned done = 0;
    if (lane == 0) done = atomicAdd(count, (unsigned)(k1 - k0)) + (unsigned)(k1 - k0);
    done = __shfl_sync(FULL_MASK, done, 0);
    if (done < (unsigned)ktiles) return false;
    __threadfence();
    if (lane == 0) *count = 0;
    // The tile's pieces come from consecutive blocks: from the one holding its first slice to the
    // one holding its last; a block with an empty range holds none.
    const i64 first = (i64)t * ktiles, last = first + ktiles;
    int b = (int)(first * gridDim.x / sk.units);
    while (b > 0 && stream_k_start(sk, b) > first) b--;
    while (stream_k_start(sk, b + 1) <= first) b++;
    i64 start = stream_k_start(sk, b);
    for (bool head = true; b < (int)gridDim.x && start < last; b++) {
        const i64 next = stream_k_start(sk, b + 1);
        const bool empty = next <= start;
        start = next;
        if (empty) continue;
        const float4* piece = stream_k_slot(sk, b, t, ktiles, warp);
        if (head) {
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const float4 v = __ldcg(&piece[j * 32 + lane]);
                acc[4 * j] = v.x, acc[4 * j + 1] = v.y, acc[4 * j + 2] = v.z, acc[4 * j + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const float4 v = __ldcg(&piece[j * 32 + lane]);
                acc[4 * j] += v.x, acc[4 * j + 1] += v.y, acc[4 * j + 2] += v.z, acc[4 * j + 3] += v.w;
            }
        }
        head = false;
    }
    return true;
}

// The whole GEMM for this block: tiles numbered row-major over (M / 128, N / BN), walked whole
// (sk null) or as stream-K pieces (BN 128 only).
template <bool Fp8, int BN, typename Value, typename Store8>
__device__ __forceinline__ void wgmma_gemm(const TensorMap* ta, const TensorMap* tw, int k_bytes, int M, int N,
                                           const StreamK* sk, Value value, Store8 store8) {
    using C = WgCfg<BN>;
    if (BN != 128 && sk) __trap();  // the launcher asks for stream-K on narrow tiles only
    const WgmmaRing r = wgmma_ring<BN>();
    const int wg = threadIdx.x >> 7;
    const int ktiles = (k_bytes + WG_KB - 1) / WG_KB, tiles_n = (N + BN - 1) / BN;
    const int tiles = ((M + TILE_M - 1) / TILE_M) * tiles_n;
    ring_barriers_init(nullptr, r.full, r.empty, C::STAGES);
    unsigned it = 0;  // K slices through the ring so far
    if (wg == 0) {
        if constexpr (BN == 256) setmaxnreg_dec<WG_PRODUCER_REGS>();
        if (threadIdx.x != 0) return;
        const int elems_per_slice = Fp8 ? WG_KB : WG_KB / 2;
        for_each_piece(sk, tiles, ktiles, [&](int t, int k0, int k1) {
            const int m0 = (t / tiles_n) * TILE_M, n0 = (t % tiles_n) * BN;
            for (int kt = k0; kt < k1; kt++, it++) {
                const int s = it % C::STAGES;
                mbarrier_wait(&r.empty[s], ((it / C::STAGES) & 1) ^ 1);  // the first round finds every stage empty
                mbarrier_arrive_expect_tx(&r.full[s], C::A_STAGE + C::W_STAGE);
                tma_load_2d(r.a + s * C::A_STAGE, ta, kt * elems_per_slice, m0, &r.full[s]);
                tma_load_2d(r.w + s * C::W_STAGE, tw, kt * elems_per_slice, n0, &r.full[s]);
            }
        });
        return;
    }
    if constexpr (BN == 256) setmaxnreg_inc<WG_CONSUMER_REGS>();
    const int warp = (threadIdx.x >> 5) - 4;  // consumer warp 0..7: rows 16 · warp of the tile
    bf16* stage = reinterpret_cast<bf16*>(reinterpret_cast<unsigned char*>(r.staged) + warp * WG_WARP_STAGE);
    for_each_piece(sk, tiles, ktiles, [&](int t, int k0, int k1) {
        float acc[C::ACC];
        wgmma_consume<Fp8, BN>(r, wg, k1 - k0, it, acc);
        it += k1 - k0;
        if constexpr (BN == 128)
            if (k1 - k0 < ktiles && !stream_k_fixup(*sk, acc, t, k0, k1, ktiles, warp)) return;
        const i64 m0 = (i64)(t / tiles_n) * TILE_M + warp * 16, n0 = (i64)(t % tiles_n) * BN;
        // 128 columns at a time through the warp's buffer: accumulators 64h.. are columns 128h..
#pragma unroll
        for (int h = 0; h < BN / 128; h++) wgmma_warp_store8(stage, acc + 64 * h, m0, n0 + 128 * h, M, N, value, store8);
    });
}

// A: tensor map of [M, K] bf16, W: of [N, K] bf16, both with 64 x 128 boxes (K x rows; W: 64 x 256 wide).
template <int BN>
__device__ __forceinline__ void gemm_bf16_body(const TensorMap* ta, const TensorMap* tw, const bf16* __restrict__ bias,
                                               int bias_mode, bf16* __restrict__ C, int M, int N, int K, i64 ldc,
                                               const StreamK* sk) {
    wgmma_gemm<false, BN>(
        ta, tw, K * 2, M, N, sk->counts ? sk : nullptr, [&](i64 m, i64 n, float v) { return v + bias_at(bias, bias_mode, m, n); },
        [&](i64 m, i64 n, uint4 y, int count) { store_bf16_upto8(C + m * ldc + n, y, count); });
}

// The gated residual in the epilogue (gemm_mma_gated_bf16's contract): C = X + gate[m / L] · y,
// y = A · Wᵀ + bias rounded to bf16 as the linear's output would be.
template <int BN>
__device__ __forceinline__ void gemm_gated_bf16_body(const TensorMap* ta, const TensorMap* tw, const bf16* __restrict__ bias,
                                                     const bf16* __restrict__ X, const bf16* __restrict__ gate, i64 gs,
                                                     int L, bf16* __restrict__ C, int M, int N, int K, const StreamK* sk) {
    wgmma_gemm<false, BN>(
        ta, tw, K * 2, M, N, sk->counts ? sk : nullptr, [&](i64, i64 n, float v) { return v + (bias ? to_f(bias[n]) : 0.f); },
        [&](i64 m, i64 n, uint4 y, int count) { gated_store8(X, gate, gs, L, C, N, m, n, y, count); });
}

// A: tensor map of the [M, K] e4m3 activation codes, W: of the [N, K] e4m3 weights, 128 x 128 boxes
// (W: 128 x 256 wide); out = acc · a_scale[m] · w_scale[n] + bias[n] (gemm_w8a8_mma_e4m3's numerics).
template <int BN>
__device__ __forceinline__ void gemm_e4m3_body(const TensorMap* ta, const float* __restrict__ a_scale, const TensorMap* tw,
                                               const float* __restrict__ w_scale, const bf16* __restrict__ bias,
                                               bf16* __restrict__ C, int M, int N, int K, i64 ldc, const StreamK* sk) {
    wgmma_gemm<true, BN>(
        ta, tw, K, M, N, sk->counts ? sk : nullptr,
        [&](i64 m, i64 n, float v) { return v * a_scale[m] * w_scale[n] + (bias ? to_f(bias[n]) : 0.f); },
        [&](i64 m, i64 n, uint4 y, int count) { store_bf16_upto8(C + m * ldc + n, y, count); });
}

// gemm_wgmma_e4m3 with the gated residual in the epilogue (gemm_w8a8_mma_gated_e4m3's contract).
template <int BN>
__device__ __forceinline__ void gemm_gated_e4m3_body(const TensorMap* ta, const float* __restrict__ a_scale,
                                                     const TensorMap* tw, const float* __restrict__ w_scale,
                                                     const bf16* __restrict__ bias, const bf16* __restrict__ X,
                                                     const bf16* __restrict__ gate, i64 gs, int L, bf16* __restrict__ C,
                                                     int M, int N, int K, const StreamK* sk) {
    wgmma_gemm<true, BN>(
        ta, tw, K, M, N, sk->counts ? sk : nullptr,
        [&](i64 m, i64 n, float v) { return v * a_scale[m] * w_scale[n] + (bias ? to_f(bias[n]) : 0.f); },
        [&](i64 m, i64 n, uint4 y, int count) { gated_store8(X, gate, gs, L, C, N, m, n, y, count); });
}
#endif

// Each kernel comes narrow (128 x 128 tiles, stream-K where asked) and wide (`_wide`: 128 x 256
// tiles, whole tiles, W's tensor map with 256-row boxes). Images for other targets trap: the
// launcher picks v3 only for sm_90a images.
// (Each kernel is declared in full, twice: the emulator's build finds kernels by their declarations.)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_BODY(call) call
#else
#define WG_BODY(call) __trap()
#endif

#define GEMM_BF16(BN) gemm_bf16_body<BN>(&ta, &tw, bias, bias_mode, C, M, N, K, ldc, &sk)
#define GEMM_BF16_PARAMS const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tw,  \
    const bf16* __restrict__ bias, int bias_mode, bf16* __restrict__ C, int M, int N, int K, i64 ldc, \
    const __grid_constant__ StreamK sk
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_bf16(GEMM_BF16_PARAMS) {
    WG_BODY(GEMM_BF16(128));
}
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_bf16_wide(GEMM_BF16_PARAMS) {
    WG_BODY(GEMM_BF16(256));
}

#define GEMM_GATED_BF16(BN) gemm_gated_bf16_body<BN>(&ta, &tw, bias, X, gate, gs, L, C, M, N, K, &sk)
#define GEMM_GATED_BF16_PARAMS const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tw,   \
    const bf16* __restrict__ bias, const bf16* __restrict__ X, const bf16* __restrict__ gate, i64 gs, int L, \
    bf16* __restrict__ C, int M, int N, int K, const __grid_constant__ StreamK sk
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_gated_bf16(GEMM_GATED_BF16_PARAMS) {
    WG_BODY(GEMM_GATED_BF16(128));
}
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_gated_bf16_wide(GEMM_GATED_BF16_PARAMS) {
    WG_BODY(GEMM_GATED_BF16(256));
}

#define GEMM_E4M3(BN) gemm_e4m3_body<BN>(&ta, a_scale, &tw, w_scale, bias, C, M, N, K, ldc, &sk)
#define GEMM_E4M3_PARAMS const __grid_constant__ TensorMap ta, const float* __restrict__ a_scale,           \
    const __grid_constant__ TensorMap tw, const float* __restrict__ w_scale, const bf16* __restrict__ bias, \
    bf16* __restrict__ C, int M, int N, int K, i64 ldc, const __grid_constant__ StreamK sk
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_e4m3(GEMM_E4M3_PARAMS) {
    WG_BODY(GEMM_E4M3(128));
}
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_e4m3_wide(GEMM_E4M3_PARAMS) {
    WG_BODY(GEMM_E4M3(256));
}

#define GEMM_GATED_E4M3(BN) gemm_gated_e4m3_body<BN>(&ta, a_scale, &tw, w_scale, bias, X, gate, gs, L, C, M, N, K, &sk)
#define GEMM_GATED_E4M3_PARAMS const __grid_constant__ TensorMap ta, const float* __restrict__ a_scale,           \
    const __grid_constant__ TensorMap tw, const float* __restrict__ w_scale, const bf16* __restrict__ bias,       \
    const bf16* __restrict__ X, const bf16* __restrict__ gate, i64 gs, int L, bf16* __restrict__ C, int M, int N, \
    int K, const __grid_constant__ StreamK sk
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_gated_e4m3(GEMM_GATED_E4M3_PARAMS) {
    WG_BODY(GEMM_GATED_E4M3(128));
}
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_gated_e4m3_wide(GEMM_GATED_E4M3_PARAMS) {
    WG_BODY(GEMM_GATED_E4M3(256));
}
