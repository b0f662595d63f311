// Numerical health: does a tensor hold NaN or ±inf? Each warp votes and one lane records the
// caller's check id with atomicMin, so the word keeps the earliest failing check (the pipeline
// numbers its checks in running order) and nothing is read back until the stage ends.
#include "common.cuh"

// A bf16 or f32 value is non-finite when its exponent bits are all ones.
__device__ __forceinline__ bool nonfinite_bits(unsigned short b) { return (b & 0x7F80u) == 0x7F80u; }
__device__ __forceinline__ bool nonfinite_bits(unsigned int b) { return (b & 0x7F800000u) == 0x7F800000u; }

template <typename Bits>
__device__ __forceinline__ void nonfinite_check(const Bits* x, i64 n, unsigned int* word, unsigned int check) {
    bool bad = false;
    GRID_STRIDE(i, n) bad |= nonfinite_bits(x[i]);
    // Blocks are whole warps and the loop has no early exit, so every lane reaches the vote.
    if (__any_sync(FULL_MASK, bad) && (threadIdx.x & 31) == 0) atomicMin(word, check);
}

extern "C" __global__ void nonfinite_check_b16(const unsigned short* x, i64 n, unsigned int* word,
                                               unsigned int check) {
    nonfinite_check(x, n, word, check);
}

extern "C" __global__ void nonfinite_check_b32(const unsigned int* x, i64 n, unsigned int* word,
                                               unsigned int check) {
    nonfinite_check(x, n, word, check);
}
