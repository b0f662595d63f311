// bf16 for the emulator build (replaces NVIDIA's cuda_bf16.h): storage plus the conversions the
// kernels use, with the hardware's rounding: cvt.rn.bf16.f32 rounds to nearest even, and NaN
// becomes the canonical 0x7FFF.
#pragma once
#include <cstdint>
#include <cstring>

inline unsigned short sim_f32_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float sim_bf16_bits_to_f32(unsigned short b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;  // trivial: __shared__ arrays of it need no initialiser
    __nv_bfloat16(float f) : __x(sim_f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double f) : __x(sim_f32_to_bf16_bits((float)f)) {}
    __nv_bfloat16(int v) : __x(sim_f32_to_bf16_bits((float)v)) {}
    operator float() const { return sim_bf16_bits_to_f32(__x); }
};
struct __nv_bfloat16_raw {
    unsigned short x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 sim_bf16_from_bits(unsigned short b) {
    __nv_bfloat16 v;
    v.__x = b;
    return v;
}
inline float __bfloat162float(__nv_bfloat16 v) { return sim_bf16_bits_to_f32(v.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return sim_bf16_from_bits(sim_f32_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return sim_bf16_from_bits(sim_f32_to_bf16_bits(f)); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 v) { return {v, v}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return {lo, hi}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return sim_bf16_from_bits(b); }
