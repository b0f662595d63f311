// The interface between host-compiled kernel modules and the emulator runtime (libcuda.so.1).
// Kernel code never touches runtime state directly: every built-in (indices, barriers, warp
// collectives, atomics, PTX wrappers) is a call into the runtime, which is not instrumented, so
// the access checks see only the kernel's own loads and stores.
#pragma once
#include <cstddef>
#include <cstdint>

struct sim_dim3 {
    unsigned x, y, z;
};

// Warp-collective shuffle modes (PTX shfl.sync .idx/.up/.down/.bfly).
enum sim_shfl_mode { SIM_SHFL_IDX = 0, SIM_SHFL_UP = 1, SIM_SHFL_DOWN = 2, SIM_SHFL_XOR = 3 };
// Warp votes.
enum sim_vote_mode { SIM_VOTE_BALLOT = 0, SIM_VOTE_ANY = 1, SIM_VOTE_ALL = 2 };
// Atomic read-modify-write operations and operand types.
enum sim_atomic_op { SIM_ATOMIC_ADD = 0, SIM_ATOMIC_MAX, SIM_ATOMIC_MIN, SIM_ATOMIC_EXCH, SIM_ATOMIC_CAS, SIM_ATOMIC_AND, SIM_ATOMIC_OR, SIM_ATOMIC_XOR };
enum sim_atomic_type { SIM_I32 = 0, SIM_U32, SIM_I64, SIM_U64, SIM_F32, SIM_F64 };

extern "C" {
sim_dim3 sim_thread_idx();
sim_dim3 sim_block_idx();
sim_dim3 sim_block_dim();
sim_dim3 sim_grid_dim();

// __syncthreads(): a real barrier among the block's threads; `line` names the call site so
// that threads waiting at different barriers are reported (divergent barrier).
void sim_syncthreads(int line);
// Warp collectives: every lane named in `mask` must reach the same operation.
uint64_t sim_shfl(int mode, unsigned mask, uint64_t value, int lane_or_delta, int width, int line);
unsigned sim_vote(int mode, unsigned mask, int predicate, int line);
void sim_syncwarp(unsigned mask, int line);
unsigned sim_activemask();

// Atomic RMW on global or shared memory; `compare` is used by CAS only. Returns the old value.
uint64_t sim_atomic(int op, int type, void* address, uint64_t value, uint64_t compare);

// Dynamic shared memory of the running block (extern __shared__ arrays).
void* sim_dynamic_smem();

// PTX wrappers (kernels/common.cuh): emulated from the PTX ISA's definitions.
void sim_cp_async(void* dst_shared, const void* src_global, int cp_size, int src_bytes);
void sim_cp_async_commit();
void sim_cp_async_wait(int pending_groups);
void sim_ldmatrix(unsigned* regs, const void* shared_row, int matrices, int trans);
void sim_mma_bf16_m16n8k16(float* d, const unsigned* a, unsigned b0, unsigned b1);
// mma.sync m16n8k32 with 8-bit inputs: `d` is float[4] (e4m3, needs sm_89+) or int[4] (s8).
enum sim_mma_8bit { SIM_MMA_E4M3 = 0, SIM_MMA_S8 = 1 };
void sim_mma_8bit_m16n8k32(void* d, const unsigned* a, unsigned b0, unsigned b1, int type);

// Hopper (sm_90a) instructions, cuda-sim/src/hopper.cpp. mbarrier: `bar` is 8 bytes of shared
// memory; arrive with `tx_bytes` > 0 is arrive.expect_tx; wait blocks until the phase of parity
// `parity` has completed (the try_wait.parity loop). TMA: a 2-D tile of the tensor map into shared
// memory, its bytes counted on `bar`. wgmma: `type` SIM_WGMMA_*, n columns, d the thread's n/2
// accumulators (float, or int32 for s8); descriptors as the PTX ISA encodes them. sim_wgmma_rs
// takes A from registers (bf16 or e4m3): `a` the thread's 4 registers of its warp's 16 rows of K,
// laid out as mma.sync m16n8k16's A fragment (bf16) or m16n8k32's (e4m3).
enum sim_wgmma_type { SIM_WGMMA_BF16 = 0, SIM_WGMMA_E4M3 = 1, SIM_WGMMA_S8 = 2 };
void sim_mbarrier_init(void* bar, unsigned count);
void sim_mbarrier_arrive(void* bar, unsigned tx_bytes);
void sim_mbarrier_wait(void* bar, unsigned parity);
void sim_tma_load_2d(void* dst_shared, const void* tensor_map, int c0, int c1, void* bar);
void sim_wgmma(int type, int n, void* d, uint64_t desc_a, uint64_t desc_b, int scale_d);
void sim_wgmma_rs(int type, int n, void* d, const unsigned* a, uint64_t desc_b, int scale_d);
void sim_wgmma_commit();
void sim_wgmma_wait(int pending_groups);
// setmaxnreg.{inc,dec}.sync.aligned.u32 count (inc: inc != 0): the warpgroup's registers per thread.
void sim_setmaxnreg(unsigned count, int inc);

// Kernel-side failure with a message (e.g. a trap or an unsupported built-in).
[[noreturn]] void sim_trap(const char* what);
}

// A kernel module (one kernels/*.cu compiled for one target) exports its table of kernels.
typedef void (*sim_kernel_thunk)(void** params);
struct sim_kernel_entry {
    const char* name;
    sim_kernel_thunk thunk;  // unpacks cuLaunchKernel's parameter pointers and calls the kernel
    const unsigned short* param_sizes;  // bytes of each parameter (a captured launch copies them)
    int param_count;
};
struct sim_module_table {
    const char* module;  // e.g. "gemm"
    const char* target;  // e.g. "sm_89"
    int count;
    const sim_kernel_entry* kernels;
};
#define SIM_MODULE_TABLE_SYMBOL "sim_module_kernels"
typedef const sim_module_table* (*sim_module_table_fn)();
