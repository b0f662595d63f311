// Force-included (-include cuda_sim.h) before every kernel source compiled for the emulator: the
// CUDA C++ qualifiers and built-ins for a host compiler. Each CUDA thread is a fiber; indices,
// barriers and warp collectives are calls into the runtime (sim_abi.h).
#pragma once
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <array>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "sim_abi.h"

#define FLUX2_CUDA_SIM 1
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#define __CUDACC_RTC__ 1

// Qualifiers. A kernel is a plain function the module's thunk calls on every fiber; noinline
// keeps it instrumented (the thunk itself is not). __shared__ is per OS thread: a worker runs
// one block at a time, and all fibers of that block share the worker's copy.
#define __global__ __attribute__((noinline))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __constant__ const
#define __grid_constant__
// `extern __shared__ T x[]` has no host meaning: dynamic shared memory is dynamic_smem<T>()
// (common.cuh), which maps to sim_dynamic_smem(); a raw extern declaration fails to link.

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};

namespace sim_builtin {
inline uint3 u3(sim_dim3 d) { return uint3{d.x, d.y, d.z}; }
}  // namespace sim_builtin
#define threadIdx (sim_builtin::u3(sim_thread_idx()))
#define blockIdx (sim_builtin::u3(sim_block_idx()))
#define blockDim (sim_builtin::u3(sim_block_dim()))
#define gridDim (sim_builtin::u3(sim_grid_dim()))
#define warpSize 32

#define __syncthreads() sim_syncthreads(__LINE__)
#define __syncwarp(...) sim_syncwarp_at(__LINE__, ##__VA_ARGS__)
// Global memory here is the host's, without caches or reordering, and a block's global atomics
// run only once every earlier block has finished: a fence has nothing left to order.
inline void __threadfence() {}
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
inline void sim_syncwarp_at(int line, unsigned mask = 0xffffffffu) { sim_syncwarp(mask, line); }
#define __trap() sim_trap("__trap()")

// Warp shuffles and votes: any 4- or 8-byte value.
template <typename T>
inline uint64_t sim_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T sim_from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
#define SIM_SHFL(fn, mode)                                                                   \
    template <typename T>                                                                    \
    inline T fn##_at(int line, unsigned mask, T v, int lane, int width = 32) {               \
        return sim_from_bits<T>(sim_shfl(mode, mask, sim_bits(v), lane, width, line));       \
    }
SIM_SHFL(sim_shfl_idx, SIM_SHFL_IDX)
SIM_SHFL(sim_shfl_up, SIM_SHFL_UP)
SIM_SHFL(sim_shfl_down, SIM_SHFL_DOWN)
SIM_SHFL(sim_shfl_xor, SIM_SHFL_XOR)
#undef SIM_SHFL
#define __shfl_sync(...) sim_shfl_idx_at(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) sim_shfl_up_at(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) sim_shfl_down_at(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) sim_shfl_xor_at(__LINE__, __VA_ARGS__)
#define __ballot_sync(mask, p) sim_vote(SIM_VOTE_BALLOT, (mask), (p) ? 1 : 0, __LINE__)
#define __any_sync(mask, p) (sim_vote(SIM_VOTE_ANY, (mask), (p) ? 1 : 0, __LINE__) != 0)
#define __all_sync(mask, p) (sim_vote(SIM_VOTE_ALL, (mask), (p) ? 1 : 0, __LINE__) != 0)
#define __activemask() sim_activemask()

// Atomics (global or shared): the runtime checks the address and orders global atomics by block.
template <typename T>
constexpr int sim_atomic_type_of() {
    if constexpr (std::is_same_v<T, float>) return SIM_F32;
    else if constexpr (std::is_same_v<T, double>) return SIM_F64;
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 4) return std::is_signed_v<T> ? SIM_I32 : SIM_U32;
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 8) return std::is_signed_v<T> ? SIM_I64 : SIM_U64;
    else return -1;
}
template <typename T>
inline T sim_atomic_rmw(int op, T* p, T v, T cmp = T()) {
    constexpr int ty = sim_atomic_type_of<T>();
    static_assert(ty >= 0, "atomic on an unsupported type");
    return sim_from_bits<T>(sim_atomic(op, ty, p, sim_bits(v), sim_bits(cmp)));
}
template <typename T> inline T atomicAdd(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_ADD, p, v); }
template <typename T> inline T atomicSub(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_ADD, p, (T)(-v)); }
template <typename T> inline T atomicMax(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_MAX, p, v); }
template <typename T> inline T atomicMin(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_MIN, p, v); }
template <typename T> inline T atomicExch(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_EXCH, p, v); }
template <typename T> inline T atomicAnd(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_AND, p, v); }
template <typename T> inline T atomicOr(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_OR, p, v); }
template <typename T> inline T atomicXor(T* p, T v) { return sim_atomic_rmw(SIM_ATOMIC_XOR, p, v); }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { return sim_atomic_rmw(SIM_ATOMIC_CAS, p, v, cmp); }

// Math. Hardware approximations (__expf, rsqrtf, exp2f's ex2.approx) are computed exactly here;
// docs/cuda-emulator.md lists the differences.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : (x != x ? 0.f : x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float exp10f(float x) { return std::pow(10.f, x); }
inline float __int_as_float(int v) { return sim_from_bits<float>((uint32_t)v); }
inline int __float_as_int(float v) { return (int)(uint32_t)sim_bits(v); }
inline float __uint_as_float(unsigned v) { return sim_from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return (uint32_t)sim_bits(v); }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((v >> i) & 1u) << (31 - i);
    return r;
}

// CUDA's integer and float min/max overloads (device functions in CUDA's math headers).
#define SIM_MINMAX(T)                                \
    inline T min(T a, T b) { return a < b ? a : b; } \
    inline T max(T a, T b) { return a > b ? a : b; }
SIM_MINMAX(int)
SIM_MINMAX(unsigned)
SIM_MINMAX(long)
SIM_MINMAX(unsigned long)
SIM_MINMAX(long long)
SIM_MINMAX(unsigned long long)
#undef SIM_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// A shared-window address (cvta.to.shared) has no host meaning; the emulated PTX wrappers take
// generic pointers instead.
inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)p; }

// Module registration: gen_module.py appends SIM_MODULE(module, target, kernel...) to each
// kernel source. The thunk reads each parameter at the kernel's own type, as the driver copies
// parameters by the sizes in the image.
namespace sim_registry {
template <typename... A, size_t... I>
__attribute__((no_sanitize_thread)) void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <typename... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}
template <auto F>
__attribute__((no_sanitize_thread)) void launch(void** params) {
    call(F, params, std::make_index_sequence<arity(F)>{});
}
// Each parameter's bytes, for launches a stream capture records (one extra 0 so that a kernel
// without parameters still has an array).
template <typename... A>
constexpr std::array<unsigned short, sizeof...(A) + 1> param_sizes(void (*)(A...)) {
    return {(unsigned short)sizeof(std::remove_cv_t<std::remove_reference_t<A>>)..., 0};
}
template <auto F>
inline constexpr auto param_sizes_of = param_sizes(F);
}  // namespace sim_registry
#define SIM_KERNEL(name) \
    {#name, &sim_registry::launch<&name>, sim_registry::param_sizes_of<&name>.data(), (int)sim_registry::arity(&name)}
#define SIM_MODULE(module, target, ...)                                                    \
    static const sim_kernel_entry sim_kernels_[] = {__VA_ARGS__};                          \
    static const sim_module_table sim_table_ = {module, target,                            \
        (int)(sizeof(sim_kernels_) / sizeof(sim_kernels_[0])), sim_kernels_};              \
    extern "C" __attribute__((visibility("default"))) const sim_module_table* sim_module_kernels() { \
        return &sim_table_;                                                                \
    }

// Inline PTX has no emulation: every instruction goes through a wrapper of kernels/common.cuh
// (emulated in sim_ptx.h). These make any other asm statement a compile error that says so.
#define asm inline_ptx_is_not_emulated__use_a_common_cuh_wrapper
#define __asm__ inline_ptx_is_not_emulated__use_a_common_cuh_wrapper
