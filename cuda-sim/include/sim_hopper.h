// The emulator's versions of the Hopper wrappers in kernels/hopper.cuh: same names and
// signatures, each a call into cuda-sim/src/hopper.cpp.
#pragma once

__forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count) { sim_mbarrier_init(bar, count); }
__forceinline__ void mbarrier_init_fence() {}
__forceinline__ void mbarrier_arrive(unsigned long long* bar) { sim_mbarrier_arrive(bar, 0); }
__forceinline__ void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    if (bytes == 0) sim_trap("mbarrier.arrive.expect_tx of 0 bytes");
    sim_mbarrier_arrive(bar, bytes);
}
__forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned parity) { sim_mbarrier_wait(bar, parity); }
__forceinline__ void tma_load_2d(void* dst, const TensorMap* map, int c0, int c1, unsigned long long* bar) {
    sim_tma_load_2d(dst, map, c0, c1, bar);
}
__forceinline__ void wgmma_fence() {}
__forceinline__ void wgmma_commit() { sim_wgmma_commit(); }
template <int N>
__forceinline__ void wgmma_wait() {
    sim_wgmma_wait(N);
}
__forceinline__ void wgmma_bf16_m64n128k16(float d[64], unsigned long long desc_a, unsigned long long desc_b, int scale_d) {
    sim_wgmma(SIM_WGMMA_BF16, 128, d, desc_a, desc_b, scale_d);
}
__forceinline__ void wgmma_e4m3_m64n128k32(float d[64], unsigned long long desc_a, unsigned long long desc_b, int scale_d) {
    sim_wgmma(SIM_WGMMA_E4M3, 128, d, desc_a, desc_b, scale_d);
}
__forceinline__ void wgmma_bf16_m64n64k16(float d[32], unsigned long long desc_a, unsigned long long desc_b, int scale_d) {
    sim_wgmma(SIM_WGMMA_BF16, 64, d, desc_a, desc_b, scale_d);
}
__forceinline__ void wgmma_bf16_m64n64k16_rs(float d[32], const unsigned a[4], unsigned long long desc_b, int scale_d) {
    sim_wgmma_rs(SIM_WGMMA_BF16, 64, d, a, desc_b, scale_d);
}
__forceinline__ void wgmma_bf16_m64n128k16_rs(float d[64], const unsigned a[4], unsigned long long desc_b, int scale_d) {
    sim_wgmma_rs(SIM_WGMMA_BF16, 128, d, a, desc_b, scale_d);
}
__forceinline__ void wgmma_s8_m64n64k32(int d[32], unsigned long long desc_a, unsigned long long desc_b, int scale_d) {
    sim_wgmma(SIM_WGMMA_S8, 64, d, desc_a, desc_b, scale_d);
}
__forceinline__ void wgmma_e4m3_m64n128k32_rs(float d[64], const unsigned a[4], unsigned long long desc_b, int scale_d) {
    sim_wgmma_rs(SIM_WGMMA_E4M3, 128, d, a, desc_b, scale_d);
}
template <unsigned N>
__forceinline__ void setmaxnreg_inc() {
    sim_setmaxnreg(N, 1);
}
template <unsigned N>
__forceinline__ void setmaxnreg_dec() {
    sim_setmaxnreg(N, 0);
}
__forceinline__ void wgmma_bf16_m64n256k16(float d[128], unsigned long long desc_a, unsigned long long desc_b, int scale_d) {
    sim_wgmma(SIM_WGMMA_BF16, 256, d, desc_a, desc_b, scale_d);
}
__forceinline__ void wgmma_e4m3_m64n256k32(float d[128], unsigned long long desc_a, unsigned long long desc_b, int scale_d) {
    sim_wgmma(SIM_WGMMA_E4M3, 256, d, desc_a, desc_b, scale_d);
}
