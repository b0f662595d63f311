// FP8 for the emulator build (replaces NVIDIA's cuda_fp8.h): E4M3 ("fn": no infinities, max 448)
// and E5M2 storage with the conversions of cvt.rn.satfinite: round to nearest even, magnitudes
// past the largest finite value (infinities included) saturate to it, NaN stays NaN.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_bf16.h"

typedef unsigned char __nv_fp8_storage_t;
enum __nv_saturation_t { __NV_NOSAT = 0, __NV_SATFINITE = 1 };
enum __nv_fp8_interpretation_t { __NV_E4M3 = 0, __NV_E5M2 = 1 };

// Round |x| onto a grid with `mbits` mantissa bits, exponent bias `bias`, smallest normal
// exponent 1 - bias; returns the magnitude code (exponent << mbits | mantissa), unsaturated.
inline uint32_t sim_fp8_round_magnitude(float a, int mbits, int bias) {
    int e;
    std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
    int exp = e - 1;    // a in [2^exp, 2^(exp+1))
    int min_exp = 1 - bias;
    if (a == 0.f) return 0;
    if (exp < min_exp) {  // subnormal: multiples of 2^(min_exp - mbits)
        return (uint32_t)std::nearbyint(std::ldexp(a, mbits - min_exp));
    }
    float q = std::nearbyint(std::ldexp(a, mbits - exp));  // in [2^mbits, 2^(mbits+1)]
    uint32_t m = (uint32_t)q - (1u << mbits);
    uint32_t code = ((uint32_t)(exp + bias) << mbits) + m;  // a carry moves into the exponent
    return code;
}

// One encoder for both formats: `max_code` is the largest finite magnitude code, `overflow` what an
// out-of-range magnitude becomes without saturation (NaN for e4m3, infinity for e5m2).
inline __nv_fp8_storage_t sim_f32_to_fp8(float x, int mbits, int bias, uint8_t max_code, uint8_t overflow, bool satfinite) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    float a = std::fabs(x);
    if (a != a) return 0x7f;
    uint32_t code = std::isinf(a) ? 0xffffffffu : sim_fp8_round_magnitude(a, mbits, bias);
    if (code > max_code) {
        if (satfinite) return (uint8_t)(sign | max_code);
        return overflow == 0x7f ? (uint8_t)0x7f : (uint8_t)(sign | overflow);  // NaN is unsigned 0x7f
    }
    return (uint8_t)(sign | code);
}
inline __nv_fp8_storage_t sim_f32_to_e4m3(float x, bool satfinite = true) {
    return sim_f32_to_fp8(x, 3, 7, 0x7e, 0x7f, satfinite);
}
inline float sim_e4m3_to_f32(__nv_fp8_storage_t c) {
    int exp = (c >> 3) & 15, m = c & 7;
    float s = (c & 0x80) ? -1.f : 1.f;
    if (exp == 15 && m == 7) return NAN;
    if (exp == 0) return s * std::ldexp((float)m, -9);
    return s * std::ldexp(1.f + m / 8.f, exp - 7);
}
inline __nv_fp8_storage_t sim_f32_to_e5m2(float x, bool satfinite = true) {
    return sim_f32_to_fp8(x, 2, 15, 0x7b, 0x7c, satfinite);
}
inline float sim_e5m2_to_f32(__nv_fp8_storage_t c) {
    int exp = (c >> 2) & 31, m = c & 3;
    float s = (c & 0x80) ? -1.f : 1.f;
    if (exp == 31) return m ? NAN : s * INFINITY;
    if (exp == 0) return s * std::ldexp((float)m, -16);
    return s * std::ldexp(1.f + m / 4.f, exp - 15);
}

inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat, __nv_fp8_interpretation_t fmt) {
    return fmt == __NV_E4M3 ? sim_f32_to_e4m3(x, sat == __NV_SATFINITE) : sim_f32_to_e5m2(x, sat == __NV_SATFINITE);
}

struct __nv_fp8_e4m3 {
    __nv_fp8_storage_t __x;
    __nv_fp8_e4m3() = default;
    explicit __nv_fp8_e4m3(float f) : __x(sim_f32_to_e4m3(f)) {}
    explicit __nv_fp8_e4m3(double f) : __x(sim_f32_to_e4m3((float)f)) {}
    explicit operator float() const { return sim_e4m3_to_f32(__x); }
};
struct __nv_fp8_e5m2 {
    __nv_fp8_storage_t __x;
    __nv_fp8_e5m2() = default;
    explicit __nv_fp8_e5m2(float f) : __x(sim_f32_to_e5m2(f)) {}
    explicit __nv_fp8_e5m2(double f) : __x(sim_f32_to_e5m2((float)f)) {}
    explicit operator float() const { return sim_e5m2_to_f32(__x); }
};
