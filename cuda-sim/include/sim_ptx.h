// The emulator's versions of the PTX wrappers in kernels/common.cuh: same names and signatures,
// each a call into the runtime, which implements the instruction from the PTX ISA's definition
// (fragment layouts, zero fill, group accounting) and checks its operands.
#pragma once

__forceinline__ void cp_async16(void* dst, const void* src, int bytes) { sim_cp_async(dst, src, 16, bytes); }
__forceinline__ void cp_async_commit() { sim_cp_async_commit(); }
template <int N>
__forceinline__ void cp_async_wait() {
    sim_cp_async_wait(N);
}
__forceinline__ void ldmatrix_x4(unsigned r[4], const void* p) { sim_ldmatrix(r, p, 4, 0); }
__forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* p) { sim_ldmatrix(r, p, 4, 1); }
__forceinline__ void mma_bf16_16816(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    sim_mma_bf16_m16n8k16(d, a, b0, b1);
}
__forceinline__ void mma_e4m3_16832(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    sim_mma_8bit_m16n8k32(d, a, b0, b1, SIM_MMA_E4M3);
}
__forceinline__ void mma_s8_16832(int d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    sim_mma_8bit_m16n8k32(d, a, b0, b1, SIM_MMA_S8);
}
