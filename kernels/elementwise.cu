// Element-wise, broadcast, layout and position kernels. bf16 storage, f32 math, one rounding
// per output. Each has a CPU reference op (src/backend/cpu) that the selftest compares against.
#include "common.cuh"

extern "C" __global__ void fill_u16(unsigned short* y, unsigned short v, i64 n) {
    GRID_STRIDE(i, n) y[i] = v;
}

extern "C" __global__ void fill_u32(unsigned* y, unsigned v, i64 n) {
    GRID_STRIDE(i, n) y[i] = v;
}

extern "C" __global__ void silu_bf16(const bf16* x, bf16* y, i64 n) {
    GRID_STRIDE(i, n) y[i] = to_bf(silu_f(to_f(x[i])));
}

// x [rows, 2m] -> y [rows, m] = silu(x[:, :m]) * x[:, m:]
extern "C" __global__ void swiglu_bf16(const bf16* x, bf16* y, i64 rows, int m) {
    GRID_STRIDE(i, rows * m) {
        i64 r = i / m;
        int c = (int)(i % m);
        const bf16* row = x + r * 2 * (i64)m;
        y[i] = to_bf(silu_f(to_f(row[c])) * to_f(row[m + c]));
    }
}

extern "C" __global__ void axpby_bf16(float a, const bf16* x, float b, const bf16* y, bf16* out, i64 n) {
    GRID_STRIDE(i, n) out[i] = to_bf(a * to_f(x[i]) + b * to_f(y[i]));
}

// x, y [B, L, C]; gate [B, C] with row stride `vs`: out = x + gate * y
extern "C" __global__ void gated_add_bf16(const bf16* x, const bf16* gate, i64 vs, const bf16* y, bf16* out, i64 L, int c,
                                          i64 n) {
    GRID_STRIDE(i, n) {
        i64 b = i / (L * c);
        int ch = (int)(i % c);
        out[i] = to_bf(to_f(x[i]) + to_f(gate[b * vs + ch]) * to_f(y[i]));
    }
}

// x [B, L, C]; shift/scale [B, C] with row strides shift_s/scale_s: out = x * (1 + scale) + shift
extern "C" __global__ void modulate_bf16(const bf16* x, const bf16* shift, i64 shift_s, const bf16* scale, i64 scale_s,
                                         bf16* out, i64 L, int c, i64 n) {
    GRID_STRIDE(i, n) {
        i64 b = i / (L * c);
        int ch = (int)(i % c);
        out[i] = to_bf(to_f(x[i]) * (1.f + to_f(scale[b * scale_s + ch])) + to_f(shift[b * shift_s + ch]));
    }
}

// v2 of silu, swiglu, axpby, gated_add and modulate: 8 bf16 per thread in 16-byte loads and
// stores, one index division per 8 elements (32-bit, div_rem), swiglu on rows of any stride (the
// DiT's strided view of its fused projection, read in place). The launchers take them when every
// pointer is 16-byte aligned and every length and row stride a multiple of 8; v1 above stays for
// the rest and as the reference. Same math per element as v1.
extern "C" __global__ void silu_bf16x8(const bf16* x, bf16* y, i64 n8) {
    GRID_STRIDE(i, n8) {
        float f[8];
        load_bf16x8(x + 8 * i, f);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] = silu_f(f[j]);
        store_bf16x8(y + 8 * i, f);
    }
}

// silu(g[0..8)) * g[m..m+8) into y[0..8): 8 columns of a SwiGLU row whose gate half starts at g.
__device__ __forceinline__ void swiglu_x8(const bf16* g, int m, bf16* y) {
    float a[8], b[8];
    load_bf16x8(g, a);
    load_bf16x8(g + m, b);
#pragma unroll
    for (int j = 0; j < 8; j++) a[j] = silu_f(a[j]) * b[j];
    store_bf16x8(y, a);
}

// x rows `ld` elements apart -> y [rows, m] = silu(x[:, :m]) * x[:, m:2m]
extern "C" __global__ void swiglu_bf16x8(const bf16* x, i64 ld, bf16* y, i64 rows, int m) {
    const int m8 = m / 8;
    GRID_STRIDE(i, rows * m8) {
        int c8;
        i64 r = div_rem(i, m8, c8);
        swiglu_x8(x + r * ld + 8 * c8, m, y + r * m + 8 * c8);
    }
}

// [prefix | swiglu(x)] per row without writing swiglu(x) on its own (the single block's input to
// its output projection): out [rows, p + m]; prefix [rows, p] dense; x rows `ld` apart, m % 8 == 0
// and p % 8 == 0. 8 columns per thread.
extern "C" __global__ void swiglu_concat_bf16x8(const bf16* prefix, const bf16* x, i64 ld, bf16* out, i64 rows, int p,
                                                int m) {
    const int w8 = (p + m) / 8;
    GRID_STRIDE(i, rows * w8) {
        int c8;
        const i64 r = div_rem(i, w8, c8);
        const int c = 8 * c8;
        bf16* dst = out + r * (p + m) + c;
        if (c < p) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(prefix + r * p + c);
        } else {
            swiglu_x8(x + r * ld + (c - p), m, dst);
        }
    }
}

extern "C" __global__ void axpby_bf16x8(float a, const bf16* x, float b, const bf16* y, bf16* out, i64 n8) {
    GRID_STRIDE(i, n8) {
        float u[8], v[8];
        load_bf16x8(x + 8 * i, u);
        load_bf16x8(y + 8 * i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) u[j] = a * u[j] + b * v[j];
        store_bf16x8(out + 8 * i, u);
    }
}

// The sample b of 8-vector i of a [B, L, C] tensor (c8 = C / 8 vectors per token), and its
// channel group ch8.
__device__ __forceinline__ i64 sample_of(i64 i, int c8, int L, int& ch8) {
    int token;
    return div_rem(div_rem(i, c8, ch8), L, token);
}

// x, y [B, L, C]; gate [B, C] with row stride `vs`: out = x + gate * y
extern "C" __global__ void gated_add_bf16x8(const bf16* x, const bf16* gate, i64 vs, const bf16* y, bf16* out, int L,
                                            int c, i64 n8) {
    GRID_STRIDE(i, n8) {
        int ch8;
        const i64 b = sample_of(i, c / 8, L, ch8);
        float u[8], g[8], v[8];
        load_bf16x8(x + 8 * i, u);
        load_bf16x8(gate + b * vs + 8 * ch8, g);
        load_bf16x8(y + 8 * i, v);
#pragma unroll
        for (int j = 0; j < 8; j++) u[j] = u[j] + g[j] * v[j];
        store_bf16x8(out + 8 * i, u);
    }
}

// x [B, L, C]; shift/scale [B, C] with row strides shift_s/scale_s: out = x * (1 + scale) + shift
extern "C" __global__ void modulate_bf16x8(const bf16* x, const bf16* shift, i64 shift_s, const bf16* scale,
                                           i64 scale_s, bf16* out, int L, int c, i64 n8) {
    GRID_STRIDE(i, n8) {
        int ch8;
        const i64 b = sample_of(i, c / 8, L, ch8);
        float u[8], sh[8], sc[8];
        load_bf16x8(x + 8 * i, u);
        load_bf16x8(shift + b * shift_s + 8 * ch8, sh);
        load_bf16x8(scale + b * scale_s + 8 * ch8, sc);
#pragma unroll
        for (int j = 0; j < 8; j++) u[j] = u[j] * (1.f + sc[j]) + sh[j];
        store_bf16x8(out + 8 * i, u);
    }
}

// NCHW x; mul/add [C] f32: out = x * mul[c] + add[c]
extern "C" __global__ void channel_affine_bf16(const bf16* x, const float* mul, const float* add, bf16* out, i64 hw, int c,
                                               i64 n) {
    GRID_STRIDE(i, n) {
        int ch = (int)((i / hw) % c);
        out[i] = to_bf(to_f(x[i]) * mul[ch] + add[ch]);
    }
}

// NCHW nearest x2: planes = B*C
extern "C" __global__ void upsample_nearest2x_bf16(const bf16* x, bf16* y, i64 planes, int h, int w) {
    i64 n = planes * 4L * h * w;
    GRID_STRIDE(i, n) {
        i64 p = i / (4L * h * w);
        int r = (int)(i % (4L * h * w));
        int oy = r / (2 * w), ox = r % (2 * w);
        y[i] = x[p * h * w + (i64)(oy / 2) * w + ox / 2];
    }
}

// v2 for rows of a multiple of 4 pixels: 8 output pixels (one 16-byte store) from 4 input ones (one
// 8-byte load) per thread, 32-bit index division (div_rem).
extern "C" __global__ void upsample_nearest2x_bf16x8(const bf16* x, bf16* y, int h, int w, i64 n8) {
    GRID_STRIDE(i, n8) {
        int ox, oy;
        const i64 row = div_rem(8 * i, 2 * w, ox);  // output row = plane * 2h + oy
        const i64 plane = div_rem(row, 2 * h, oy);
        const uint2 in = *reinterpret_cast<const uint2*>(x + (plane * h + oy / 2) * w + ox / 2);
        // Each 32-bit word holds two input pixels (low first): each becomes two output pixels.
        auto twice = [](unsigned p) { return (p & 0xffffu) * 0x10001u; };
        auto twice_hi = [](unsigned p) { return (p >> 16) * 0x10001u; };
        uint4 out;
        out.x = twice(in.x);
        out.y = twice_hi(in.x);
        out.z = twice(in.y);
        out.w = twice_hi(in.y);
        *reinterpret_cast<uint4*>(y + 8 * i) = out;
    }
}

extern "C" __global__ void embedding_bf16(const unsigned* ids, const bf16* table, bf16* out, i64 n_ids, int c) {
    GRID_STRIDE(i, n_ids * c) {
        i64 t = i / c;
        out[i] = table[(i64)ids[t] * c + i % c];
    }
}

// out [B, dim] = [cos(t f_j), sin(t f_j)], f_j = exp(neg_log_period * j / half), f32 like diffusers.
// The timesteps are read from device memory, so a recorded denoising step (a CUDA graph) takes
// each step's values from its input buffer.
extern "C" __global__ void timestep_embedding_bf16(const float* t, bf16* out, int batch, int dim, float neg_log_period) {
    int half = dim / 2;
    GRID_STRIDE(i, (i64)batch * dim) {
        int b = (int)(i / dim), j = (int)(i % dim);
        int k = j < half ? j : j - half;
        float f = expf(neg_log_period * (float)k / (float)half);
        float a = t[b] * f;
        // An odd dim ends in a zero column (diffusers pads it).
        out[i] = to_bf(j >= 2 * half ? 0.f : j < half ? cosf(a) : sinf(a));
    }
}

// x [B, N, H, D]; cos/sin [N, D/2] f32. interleaved: pairs (2m, 2m+1); else (m, m + D/2).
extern "C" __global__ void rope_bf16(const bf16* x, const float* cos_t, const float* sin_t, bf16* out, i64 rows, int n,
                                     int h, int d, int interleaved) {
    int half = d / 2;
    GRID_STRIDE(i, rows * half) {
        i64 row = i / half;
        int m = (int)(i % half);
        int token = (int)((row / h) % n);
        int i0 = interleaved ? 2 * m : m, i1 = interleaved ? 2 * m + 1 : m + half;
        const bf16* xr = x + row * d;
        float a = to_f(xr[i0]), b = to_f(xr[i1]);
        float c = cos_t[(i64)token * half + m], s = sin_t[(i64)token * half + m];
        out[row * d + i0] = to_bf(a * c - b * s);
        out[row * d + i1] = to_bf(b * c + a * s);
    }
}

// Strided copy of up to 6 dims (row-major over `size`): dst[dst_stride . idx] = src[src_stride . idx]
struct Strided6 {
    i64 size[6];
    i64 src[6];
    i64 dst[6];
};

template <typename T>
__device__ __forceinline__ void strided_copy(T* dst, const T* src, const Strided6& s, i64 n) {
    GRID_STRIDE(i, n) {
        i64 rem = i, so = 0, dof = 0;
#pragma unroll
        for (int d = 5; d >= 0; d--) {
            i64 k = rem % s.size[d];
            rem /= s.size[d];
            so += k * s.src[d];
            dof += k * s.dst[d];
        }
        dst[dof] = src[so];
    }
}

extern "C" __global__ void strided_copy_b16(unsigned short* dst, const unsigned short* src, Strided6 s, i64 n) {
    strided_copy(dst, src, s, n);
}

extern "C" __global__ void strided_copy_b32(unsigned* dst, const unsigned* src, Strided6 s, i64 n) {
    strided_copy(dst, src, s, n);
}

// v2: views whose innermost dim is contiguous on both sides and a multiple of 16 bytes long, as
// 16-byte units (any element size): sizes and strides in units, one 16-byte load and store per
// thread, 32-bit index division (div_rem; every size fits an int). The launcher merges dims that
// are contiguous on both sides first, so a concat or a narrow is one or two dims here.
extern "C" __global__ void strided_copy_x16(uint4* dst, const uint4* src, Strided6 s, i64 n) {
    GRID_STRIDE(i, n) {
        i64 rem = i, so = 0, dof = 0;
#pragma unroll
        for (int d = 5; d >= 0; d--) {
            if (s.size[d] == 1) continue;
            int k;
            rem = div_rem(rem, (int)s.size[d], k);
            so += k * s.src[d];
            dof += k * s.dst[d];
        }
        dst[dof] = src[so];
    }
}

