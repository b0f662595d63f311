// GGML block quantization as GGUF files store it (src/weights/ggml.rs is the CPU reference), one
// element at a time, for the weight-only GEMM's tile staging: element k of row n of a [N, K]
// weight whose rows are whole blocks. Every product and difference is rounded in f32 in ggml's
// order (__fmul_rn/__fsub_rn: no contraction into FMA), so the values are ggml's bit for bit.
#pragma once
#include "common.cuh"

// An f16 (little-endian bytes) widened to f32 exactly, by its bits.
__device__ __forceinline__ float ggml_f16(const unsigned char* p) {
    unsigned h = p[0] | (p[1] << 8);
    unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 31, mant = h & 1023;
    if (exp == 0) {  // zero and subnormals: mant · 2^-24, exact in f32
        float v = (float)mant * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    unsigned bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
    return __uint_as_float(bits);
}

// The 4-bit value e of 32 whose 16 bytes hold element j (low nibble) and j + 16 (high nibble).
__device__ __forceinline__ int ggml_nibble32(const unsigned char* qs, int e) { return (qs[e & 15] >> (4 * (e >> 4))) & 15; }

// Q4_K/Q5_K: the 6-bit scale and min of sub-block j (0..7) from their 12 packed bytes.
__device__ __forceinline__ void ggml_scale_min_k4(const unsigned char* s, int j, int* sc, int* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

// type: GGUF's type id (2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K).
__device__ float ggml_at(const unsigned char* q, int type, i64 n, int k, int K) {
    int bs = type >= 10 ? 256 : 32;
    int size;
    switch (type) {
        case 2: size = 18; break;
        case 3: size = 20; break;
        case 6: size = 22; break;
        case 7: size = 24; break;
        case 8: size = 34; break;
        case 10: size = 84; break;
        case 11: size = 110; break;
        case 12: size = 144; break;
        case 13: size = 176; break;
        default: size = 210; break;  // 14: Q6_K
    }
    const unsigned char* b = q + (n * (K / bs) + k / bs) * (i64)size;
    int e = k % bs;
    switch (type) {
        case 2: return __fmul_rn(ggml_f16(b), (float)(ggml_nibble32(b + 2, e) - 8));
        case 3: return __fadd_rn(__fmul_rn(ggml_f16(b), (float)ggml_nibble32(b + 4, e)), ggml_f16(b + 2));
        case 6:
        case 7: {
            int at = type == 7 ? 4 : 2;
            unsigned qh = b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | ((unsigned)b[at + 3] << 24);
            int v = ggml_nibble32(b + at + 4, e) | (((qh >> e) & 1) << 4);
            if (type == 7) return __fadd_rn(__fmul_rn(ggml_f16(b), (float)v), ggml_f16(b + 2));
            return __fmul_rn(ggml_f16(b), (float)(v - 16));
        }
        case 8: return __fmul_rn((float)(signed char)b[2 + e], ggml_f16(b));
        case 10: {
            int half = e >> 7, shift = (e & 127) >> 5, l = e & 31;
            int v = (b[16 + half * 32 + l] >> (2 * shift)) & 3;
            int s = b[e >> 4];
            float dl = __fmul_rn(ggml_f16(b + 80), (float)(s & 15));
            float ml = __fmul_rn(ggml_f16(b + 82), (float)(s >> 4));
            return __fsub_rn(__fmul_rn(dl, (float)v), ml);
        }
        case 11: {
            const unsigned char* scales = b + 96;
            int j = e >> 4;
            int low = (scales[j & 7] >> (4 * (j >> 3))) & 15;
            int high = (scales[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
            float dl = __fmul_rn(ggml_f16(b + 108), (float)((low | (high << 4)) - 32));
            int half = e >> 7, shift = (e & 127) >> 5, l = e & 31;
            int v = (b[32 + half * 32 + l] >> (2 * shift)) & 3;
            // The high bit subtracts 4 when it is clear (ggml's hmask convention).
            int hb = ((b[l] >> (e >> 5)) & 1) ^ 1;
            return __fmul_rn(dl, (float)(v - (hb << 2)));
        }
        case 12:
        case 13: {
            int sc, mn;
            ggml_scale_min_k4(b + 4, e >> 5, &sc, &mn);
            const unsigned char* qs = b + (type == 13 ? 48 : 16);
            int chunk = e >> 6, shift = (e & 63) >> 5, l = e & 31;
            int v = (qs[chunk * 32 + l] >> (4 * shift)) & 15;
            if (type == 13) v |= ((b[16 + l] >> (e >> 5)) & 1) << 4;
            float d = __fmul_rn(ggml_f16(b), (float)sc);
            return __fsub_rn(__fmul_rn(d, (float)v), __fmul_rn(ggml_f16(b + 2), (float)mn));
        }
        default: {  // 14: Q6_K
            int half = e >> 7;
            int low = (b[half * 64 + (e & 63)] >> (4 * ((e & 127) >> 6))) & 15;
            int high = (b[128 + half * 32 + (e & 31)] >> (2 * ((e & 127) >> 5))) & 3;
            float d = __fmul_rn(ggml_f16(b + 208), (float)(signed char)b[192 + (e >> 4)]);
            return __fmul_rn(d, (float)((low | (high << 4)) - 32));
        }
    }
}
