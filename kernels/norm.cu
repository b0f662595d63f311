// Normalisations: LayerNorm (+ fused adaLN modulate), RMSNorm, GroupNorm (+ SiLU). One block per
// row for the row norms (two-pass mean/variance in f32); GroupNorm in two kernels: per-chunk
// partial sums into f64 statistics, then an element-wise apply.
#include "common.cuh"
#include "qk_norm.cuh"

// LayerNorm over the last dim (no affine). With shift/scale ([B, C], row strides shift_s and
// scale_s), applies x * (1 + scale[b]) + shift[b], b = row / rows_per_sample.
extern "C" __global__ void layer_norm_bf16(const bf16* x, bf16* y, int c, float eps, const bf16* shift, const bf16* scale,
                                           i64 shift_s, i64 scale_s, i64 rows_per_sample) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    const bf16* xr = x + row * c;
    float mean;
    const float inv = block_mean_rstd(xr, c, eps, scratch, mean);
    i64 b = row / rows_per_sample;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float n = (to_f(xr[i]) - mean) * inv;
        if (shift) n = n * (1.f + to_f(scale[b * scale_s + i])) + to_f(shift[b * shift_s + i]);
        y[row * c + i] = to_bf(n);
    }
}

// RMSNorm over the last dim with an optional weight.
extern "C" __global__ void rms_norm_bf16(const bf16* x, const bf16* w, bf16* y, int c, float eps) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    const bf16* xr = x + row * c;
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float v = to_f(xr[i]);
        s += v * v;
    }
    float inv = rsqrtf(block_sum(s, scratch) / c + eps);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float n = to_f(xr[i]) * inv;
        y[row * c + i] = to_bf(w ? n * to_f(w[i]) : n);
    }
}

// RMSNorm over the head dim then RoPE (the q/k path of attention), one warp per (token, head)
// row: x [B, L, H, d] with tokens `ld` elements apart and heads d apart (a slice of a fused
// projection read in place), w [d] or null, cos/sin [L, d/2] f32, out dense [B, L, H, d]. The
// normed value is rounded to bf16 before the rotation, as rms_norm_bf16 then rope_bf16 do.
extern "C" __global__ void rms_norm_rope_bf16(const bf16* x, i64 ld, const bf16* w, const float* cos_t,
                                              const float* sin_t, bf16* out, i64 rows, int L, int H, int d, float eps,
                                              int interleaved) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // a whole warp
    const int lane = threadIdx.x & 31, half = d / 2;
    int head, pos;
    const i64 token = div_rem(row, H, head);
    div_rem(token, L, pos);
    const bf16* xr = x + token * ld + (i64)head * d;
    const float inv = qk_rms_inverse(xr, d, eps);
    bf16* orow = out + row * d;
    for (int m = lane; m < half; m += 32) {
        int i0, i1;
        rope_pair(m, half, interleaved, i0, i1);
        float a = qk_normed(xr, w, inv, i0), b = qk_normed(xr, w, inv, i1);
        float c = cos_t[(i64)pos * half + m], s = sin_t[(i64)pos * half + m];
        orow[i0] = to_bf(a * c - b * s);
        orow[i1] = to_bf(b * c + a * s);
    }
}

// Partial (sum, sum of squares) of `chunk` elements of group blockIdx.y into stats[2*group],
// shifted by the group's first element so E[x^2] - E[x]^2 does not cancel catastrophically.
extern "C" __global__ void group_norm_stats_bf16(const bf16* x, double* stats, i64 group_size, i64 chunk) {
    __shared__ float scratch[32];
    i64 g = blockIdx.y;
    i64 start = (i64)blockIdx.x * chunk;
    i64 end = min(start + chunk, group_size);
    const bf16* xg = x + g * group_size;
    float shift = to_f(xg[0]);
    float s = 0.f, q = 0.f;
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float v = to_f(xg[i]) - shift;
        s += v;
        q += v * v;
    }
    s = block_sum(s, scratch);
    q = block_sum(q, scratch);
    if (threadIdx.x == 0) {
        atomicAdd(&stats[2 * g], (double)s);
        atomicAdd(&stats[2 * g + 1], (double)q);
    }
}

// Per group, once: f32 mean and 1/sqrt(var + eps) from the f64 partial sums (undoing the shift).
extern "C" __global__ void group_norm_finalize_bf16(const bf16* x, const double* stats, float* mean_rstd,
                                                    i64 group_size, float eps, int n_groups) {
    int g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n_groups) return;
    double shift = (double)to_f(x[(i64)g * group_size]);
    double mean_shifted = stats[2 * g] / group_size;
    double var = fmax(stats[2 * g + 1] / group_size - mean_shifted * mean_shifted, 0.0);
    mean_rstd[2 * g] = (float)(shift + mean_shifted);
    mean_rstd[2 * g + 1] = (float)rsqrt(var + eps);
}

// y = (x - mean) * rstd * w[c] + b[c], optionally SiLU. x NCHW, groups per sample.
extern "C" __global__ void group_norm_apply_bf16(const bf16* x, const float* mean_rstd, const bf16* w, const bf16* b,
                                                 bf16* y, int c, int groups, i64 hw, int silu, i64 n) {
    i64 group_size = (i64)(c / groups) * hw;
    GRID_STRIDE(i, n) {
        i64 g = i / group_size;  // = sample * groups + group
        int ch = (int)((i / hw) % c);
        float v = (to_f(x[i]) - mean_rstd[2 * g]) * mean_rstd[2 * g + 1] * to_f(w[ch]) + to_f(b[ch]);
        y[i] = to_bf(silu ? silu_f(v) : v);
    }
}

// v2 of group_norm_apply_bf16 for planes of a multiple of 8 pixels: 8 elements of one channel per
// thread in 16-byte accesses, the plane index from one 32-bit division (div_rem) per 8 elements.
extern "C" __global__ void group_norm_apply_bf16x8(const bf16* x, const float* mean_rstd, const bf16* w, const bf16* b,
                                                   bf16* y, int c, int groups, int hw, int silu, i64 n8) {
    const int per_group = c / groups;
    GRID_STRIDE(i, n8) {
        int pixel;
        const i64 plane = div_rem(8 * i, hw, pixel);  // = sample * c + channel
        int ch;
        div_rem(plane, c, ch);
        int unused;
        const i64 g = div_rem(plane, per_group, unused);  // = sample * groups + group (a group's channels are adjacent)
        // The same expression order as v1: ((x - mean) * rstd) * w + b.
        const float mean = mean_rstd[2 * g], rstd = mean_rstd[2 * g + 1], wc = to_f(w[ch]), bc = to_f(b[ch]);
        float v[8];
        load_bf16x8(x + 8 * i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float t = (v[j] - mean) * rstd * wc + bc;
            v[j] = silu ? silu_f(t) : t;
        }
        store_bf16x8(y + 8 * i, v);
    }
}

