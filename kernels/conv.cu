// 2-D convolution, NCHW bf16, f32 accumulation:
//   out[b, co, oy, ox] = Σ_{ci, ky, kx} w[co, ci, ky, kx] · x[b, ci, oy·s + ky − pad_t, ox·s + kx − pad_l] + bias[co]
//   v1 im2col_bf16 + gemm_*_bf16 (gemm.cu): materialised columns; the reference, and the path for
//      kernels whose input patch does not fit in shared memory.
//   v2 conv2d_mma_bf16: an implicit GEMM on tensor cores (mma.sync m16n8k16), no columns written.
//   conv2d_narrow_c{4,8}_bf16: for at most 4 / 8 output channels (the VAE decoder's conv_out,
//      128 -> 3 at full resolution), where v2's 128-channel tile would be 97% padding: CUDA cores,
//      one output pixel per thread with all its channels in registers (see below).
//
// v2 as a GEMM: M = Cout (the weights are the A operand), N = output pixels, K walked as (chunk of
// 32 input channels, tap ky·kw + kx, channel in the chunk). A block computes 128 output channels of
// one 8 x 16 tile of output pixels with the warp layout and accumulators of mma_tile.cuh. Per chunk
// it stages the input patch the tile reads ((8−1)·s + kh rows by (16−1)·s + kw columns, zeros
// outside the image and past Cin) channel-innermost, 80 bytes per position, so that for every tap
// the B fragment of a pixel is 64 contiguous bytes ldmatrix reads through per-lane row addresses.
// With stride s the patch columns are stored by phase (px mod s first, then px / s), so the 8 pixels
// of one ldmatrix sit at consecutive positions and the reads stay free of bank conflicts.
// Weights are packed once per call to [Cout][kh·kw][Cin rounded up to 32] (conv_pack_weight_bf16)
// and stream through a 2-stage cp.async pipeline, one (chunk, tap) tile of 128 x 64 bytes per stage.
#include "common.cuh"
#include "mma_tile.cuh"

#define CONV_TILE_ROWS 8
#define CONV_TILE_COLS 16
#define CONV_CHUNK 32  // input channels per patch (64 bytes: one weight stage)

// wp[co][t][ci] = w[co][ci][t] for ci < cin, 0 for cin <= ci < cin_pad (t = ky·kw + kx).
extern "C" __global__ void conv_pack_weight_bf16(const bf16* __restrict__ w, bf16* __restrict__ wp, int cout, int cin,
                                                 int taps, int cin_pad) {
    // At most Cout · taps · Cin_pad = 512 · 9 · 512 elements on klein's VAE: 32-bit index math.
    const int total = cout * taps * cin_pad;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int ci = i % cin_pad, rest = i / cin_pad;
        int t = rest % taps, co = rest / taps;
        wp[i] = ci < cin ? w[((i64)co * cin + ci) * taps + t] : to_bf(0.f);
    }
}

// Grid: (pixel tiles = ceil(ho/8) · ceil(wo/16), ceil(cout/128), batch); 256 threads; dynamic
// shared memory 2 · 128 · 80 (weight stages) + patch rows · (s · ceil(patch cols / s)) · 80 bytes.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_mma_bf16(const bf16* __restrict__ x, const bf16* __restrict__ wp, const bf16* __restrict__ bias,
                    bf16* __restrict__ out, int cin, int h, int w, int cout, int kh, int kw, int stride, int pad_t,
                    int pad_l, int ho, int wo, int cin_pad) {
    unsigned char* smem = dynamic_smem<unsigned char>();
    // Stage k of the weights at smem + k · TILE_M · TILE_LDS (an offset, not a pointer array,
    // which would live on the stack), then the patch.
    unsigned char* patch = smem + 2 * TILE_M * TILE_LDS;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int warp_n = warp & 3;
    const int s = stride, taps = kh * kw;
    const int tiles_x = (wo + CONV_TILE_COLS - 1) / CONV_TILE_COLS;
    const int oy0 = (int)(blockIdx.x / tiles_x) * CONV_TILE_ROWS, ox0 = (int)(blockIdx.x % tiles_x) * CONV_TILE_COLS;
    const int m0 = blockIdx.y * TILE_M;
    const int patch_rows = (CONV_TILE_ROWS - 1) * s + kh, patch_cols = (CONV_TILE_COLS - 1) * s + kw;
    const int phase_cols = (patch_cols + s - 1) / s, patch_width = s * phase_cols;
    const int iy0 = oy0 * s - pad_t, ix0 = ox0 * s - pad_l;
    const bf16* xb = x + (i64)blockIdx.z * cin * h * w;
    const i64 w_row = (i64)taps * cin_pad;  // packed weight elements per output channel

    // Channel pairs of one chunk into the patch: 4-byte shared stores, global reads coalesced
    // along the patch columns.
    auto load_patch = [&](int ci0) {
        const int plane = patch_rows * patch_cols;
        for (int e = tid; e < (CONV_CHUNK / 2) * plane; e += 256) {
            int pair = e / plane, r = e - pair * plane;
            int py = r / patch_cols, px = r - py * patch_cols;
            int iy = iy0 + py, ix = ix0 + px, ci = ci0 + 2 * pair;
            bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
            const bf16* src = xb + ((i64)ci * h + iy) * w + ix;
            float v0 = inside && ci < cin ? to_f(src[0]) : 0.f;
            float v1 = inside && ci + 1 < cin ? to_f(src[(i64)h * w]) : 0.f;
            int pos = py * patch_width + (px % s) * phase_cols + px / s;
            *reinterpret_cast<unsigned*>(patch + pos * TILE_LDS + pair * 4) = pack_bf16x2(v0, v1);
        }
    };
    // The weight tile of (chunk, tap) into a stage: 128 rows x 64 bytes in 16-byte chunks.
    auto load_weights = [&](int stage, int chunk, int tap) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int c = tid + i * 256;
            int row = c >> 2, col = (c & 3) * 16;
            int gm = m0 + row;
            bool ok = gm < cout;
            const unsigned char* src = reinterpret_cast<const unsigned char*>(
                                           wp + gm * w_row + (i64)tap * cin_pad + chunk * CONV_CHUNK) +
                                       col;
            cp_async16(smem + (stage * TILE_M + row) * TILE_LDS + col, ok ? (const void*)src : (const void*)wp, ok ? 16 : 0);
        }
        cp_async_commit();
    };

    float acc[4][4][4];
    mma_tile_zero(acc);

    const int chunks = cin_pad / CONV_CHUNK, steps = chunks * taps;
    load_weights(0, 0, 0);
    int chunk = 0, tap = 0;
    for (int i = 0; i < steps; i++) {
        // The previous step ended with a barrier: nobody still reads the old patch.
        if (tap == 0) load_patch(chunk * CONV_CHUNK);
        if (i + 1 < steps) {
            int next_tap = tap + 1 == taps ? 0 : tap + 1;
            load_weights((i + 1) & 1, next_tap == 0 ? chunk + 1 : chunk, next_tap);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // This lane's pixel row for each 16-pixel ldmatrix of the warp's 32 pixels, at this tap.
        const int ky = tap / kw, kx = tap - ky * kw;
        const unsigned char* brow[2];
#pragma unroll
        for (int nj = 0; nj < 2; nj++) {
            int n = warp_n * 32 + nj * 16 + (lane & 7) + (lane >> 4) * 8;
            int py = (n / CONV_TILE_COLS) * s + ky, px = (n % CONV_TILE_COLS) * s + kx;
            brow[nj] = patch + (py * patch_width + (px % s) * phase_cols + px / s) * TILE_LDS + ((lane >> 3) & 1) * 16;
        }
        mma_tile_stage_rows<mma_bf16_16816>(smem + (i & 1) * TILE_M * TILE_LDS,
                                            [&](int nj) { return brow[nj]; }, acc);
        __syncthreads();
        if (++tap == taps) {
            tap = 0;
            chunk++;
        }
    }

    bf16* ob = out + (i64)blockIdx.z * cout * ho * wo;
    mma_tile_store(acc, m0, 0, cout, TILE_M, [&](i64 m, i64 n, float v) {
        int oy = oy0 + (int)n / CONV_TILE_COLS, ox = ox0 + (int)n % CONV_TILE_COLS;
        if (oy < ho && ox < wo) ob[(m * ho + oy) * wo + ox] = to_bf(v + (bias ? to_f(bias[m]) : 0.f));
    });
}

// Few output channels: one thread per output pixel keeps all NC (>= cout) channel sums; the input
// channels go in chunks of CONV_CHUNK whose weights are staged in shared memory as f32
// [channel][tap][NC] (zero past cout), so each tap is one input load and NC FMAs on a broadcast
// weight read. Adjacent threads read adjacent pixels (coalesced; the kh x kw window's reuse comes
// from L1). Needs kh · kw ≤ 25 (the launcher's check: 25.6 KB of weights at NC = 8).
template <int NC>
__device__ __forceinline__ void conv2d_narrow(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                              const bf16* __restrict__ bias, bf16* __restrict__ out, int cin, int h,
                                              int wd, int cout, int kh, int kw, int s, int pad_t, int pad_l, int ho,
                                              int wo) {
    float* wsm = dynamic_smem<float>();
    const int taps = kh * kw;
    const i64 pixels = (i64)ho * wo;
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = p < pixels;
    const int oy = live ? (int)(p / wo) : 0, ox = live ? (int)(p % wo) : 0;
    const int iy0 = oy * s - pad_t, ix0 = ox * s - pad_l;
    const bf16* xb = x + (i64)blockIdx.y * cin * h * wd;
    float acc[NC];
#pragma unroll
    for (int co = 0; co < NC; co++) acc[co] = 0.f;
    for (int c0 = 0; c0 < cin; c0 += CONV_CHUNK) {
        const int cn = min(CONV_CHUNK, cin - c0);
        __syncthreads();  // the previous chunk's weights have been read
        for (int i = threadIdx.x; i < cn * taps * NC; i += blockDim.x) {
            const int co = i % NC, t = (i / NC) % taps, c = i / (NC * taps);
            wsm[i] = co < cout ? to_f(w[((i64)co * cin + c0 + c) * taps + t]) : 0.f;
        }
        __syncthreads();
        if (!live) continue;
        for (int c = 0; c < cn; c++) {
            const bf16* xc = xb + (i64)(c0 + c) * h * wd;
            for (int ky = 0; ky < kh; ky++) {
                const int iy = iy0 + ky;
                if (iy < 0 || iy >= h) continue;
                for (int kx = 0; kx < kw; kx++) {
                    const int ix = ix0 + kx;
                    if (ix < 0 || ix >= wd) continue;
                    const float v = to_f(xc[(i64)iy * wd + ix]);
                    const float* wt = wsm + (c * taps + ky * kw + kx) * NC;
#pragma unroll
                    for (int co = 0; co < NC; co++) acc[co] = fmaf(v, wt[co], acc[co]);
                }
            }
        }
    }
    if (!live) return;
    bf16* ob = out + (i64)blockIdx.y * cout * pixels + p;
#pragma unroll
    for (int co = 0; co < NC; co++)
        if (co < cout) ob[co * pixels] = to_bf(acc[co] + (bias ? to_f(bias[co]) : 0.f));
}

// Grid (pixel blocks of 256, batch); dynamic shared memory CONV_CHUNK · kh · kw · NC floats.
extern "C" __global__ void __launch_bounds__(256)
    conv2d_narrow_c4_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,
                          bf16* __restrict__ out, int cin, int h, int wd, int cout, int kh, int kw, int s, int pad_t,
                          int pad_l, int ho, int wo) {
    conv2d_narrow<4>(x, w, bias, out, cin, h, wd, cout, kh, kw, s, pad_t, pad_l, ho, wo);
}

extern "C" __global__ void __launch_bounds__(256)
    conv2d_narrow_c8_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,
                          bf16* __restrict__ out, int cin, int h, int wd, int cout, int kh, int kw, int s, int pad_t,
                          int pad_l, int ho, int wo) {
    conv2d_narrow<8>(x, w, bias, out, cin, h, wd, cout, kh, kw, s, pad_t, pad_l, ho, wo);
}
