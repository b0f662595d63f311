// Internal state of the emulated driver: device profile, allocations, modules and functions,
// launches, and the per-worker execution state the access checks consult.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "../include/sim_abi.h"
#include "fiber.h"
#include "image.h"

namespace sim {

// CUresult values used here (cuda.h).
enum Result : int {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_NOT_INITIALIZED = 3,
    ERR_NO_DEVICE = 100,
    ERR_INVALID_DEVICE = 101,
    ERR_INVALID_IMAGE = 200,
    ERR_INVALID_CONTEXT = 201,
    ERR_NO_BINARY_FOR_GPU = 209,
    ERR_INVALID_HANDLE = 400,
    ERR_ILLEGAL_STATE = 401,
    ERR_NOT_FOUND = 500,
    ERR_NOT_READY = 600,
    ERR_ILLEGAL_ADDRESS = 700,
    ERR_LAUNCH_OUT_OF_RESOURCES = 701,
    ERR_ILLEGAL_INSTRUCTION = 715,
    ERR_MISALIGNED_ADDRESS = 716,
    ERR_LAUNCH_FAILED = 719,
    ERR_NOT_SUPPORTED = 801,
    ERR_STREAM_CAPTURE_UNSUPPORTED = 900,
    ERR_STREAM_CAPTURE_INVALIDATED = 901,
    ERR_UNKNOWN = 999,
};

// ---- device profile (profiles.cpp) ----
struct Profile {
    const char* arch;  // FLUX2_SIM_ARCH value: "sm_90a"
    const char* card;  // the card it models
    int major, minor;
    bool arch_specific;  // has the "a" feature set (sm_90a)
    int sms;
    int max_threads_per_sm;
    int smem_per_block;        // default limit (48 KB)
    int smem_per_block_optin;  // with CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    int smem_per_sm;
    int regs_per_block;
    int regs_per_sm;
    size_t memory;
    int clock_khz, mem_clock_khz, bus_width_bits, l2_bytes;
};
const Profile& profile();
size_t device_memory();  // FLUX2_SIM_MEMORY or the profile's
std::string device_name();

// ---- device memory (memory.cpp) ----
struct Allocation {
    uintptr_t base;
    size_t size;
    uint64_t id;
    // Graph memory (a captured cuMemAllocAsync) that no launch of its graph holds now: it
    // exists only between the launch's allocation and free nodes.
    bool graph_idle = false;
};
Result mem_alloc(size_t bytes, uintptr_t* out);
Result mem_free(uintptr_t ptr);
// Mark the allocation at `base` as graph memory held (false) or not held (true) by a launch.
void mem_set_graph_idle(uintptr_t base, bool idle);
size_t mem_used();
// The live allocation containing [addr, addr + size), or false with a description of what is
// there instead (a gap, a freed block, past the end of one) in `why`.
bool mem_find(uintptr_t addr, size_t size, Allocation* out, std::string* why);
// Checked host-side range (memcpy/memset): the whole range must be in one live allocation.
Result mem_check_range(uintptr_t addr, size_t size, const char* what);

// ---- modules and functions (driver.cpp, host_modules.cpp) ----
struct HostKernel {
    const char* name;
    sim_kernel_thunk thunk;
    const unsigned short* param_sizes;  // bytes per parameter, param_count of them
    int param_count;
    void* handle;        // the module .so (dlopen handle)
    size_t tls_modid;    // its TLS module id: static __shared__ lives in its TLS block
    size_t tls_size;
};
// The host build of `name` for `target` (sm_80, ..., sm_90a, sm_120), or nullptr with `why`.
const HostKernel* host_kernel(const std::string& target, const std::string& name, std::string* why);

struct Function {
    std::string name;
    std::string target;  // host build used
    KernelImageInfo image;
    int image_arch;
    bool image_arch_specific;
    const HostKernel* host;
    int max_dynamic_smem = 0;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    std::atomic<uint64_t> launches{0};
    std::atomic<uint64_t> emulated_ns{0};  // time spent emulating its launches (FLUX2_SIM_PROFILE)
};
struct Module {
    ImageInfo info;
    std::string target;
    std::vector<Function*> functions;
};

// ---- execution (exec.cpp) ----
struct LaunchConfig {
    Function* fn;
    sim_dim3 grid, block;
    unsigned smem_bytes;
    void** params;
};
// Runs the kernel to completion; on a detected defect returns its error code and sets the
// message (kernel, block, thread, address) returned by cuGetErrorString.
Result launch(const LaunchConfig& cfg);

// The last detailed error, for cuGetErrorString; sticky errors poison the context as on a GPU.
void set_error_detail(Result code, const std::string& msg);
const char* error_detail(Result code);

// ---- per-worker execution state, shared by exec.cpp, access.cpp and ptx.cpp ----
enum class ThreadState : uint8_t { Runnable, Barrier, Warp, MbarrierWait, WgmmaWait, Exited };

struct CpAsyncOp {
    uint8_t* dst;
    const uint8_t* src;
    int size, src_bytes;
};

enum class Collective : uint8_t { None, Shfl, Vote, SyncWarp, LdMatrix, Mma, Wgmma };

struct BlockState;

// A thread's share of one warpgroup wgmma: the op, its accumulators (float, int32 for s8),
// whether D starts from them.
struct WgmmaPart {
    uint64_t op;
    void* d;
    bool scale_d;
};

// One mbarrier (hopper.cpp): arrivals still expected in the current phase, the transaction bytes
// still expected, the phase count, and the TMA copies attached to it that have not landed.
struct TmaCopy {
    uint8_t* dst;
    std::vector<uint8_t> bytes;
};
struct Mbarrier {
    unsigned count = 0, pending = 0;
    int64_t tx = 0;
    unsigned phase = 0;
    std::vector<TmaCopy> copies;
};

// One wgmma of a warpgroup (issued by its 128 threads in turn): operands, and the product A·B
// once computed (at the first retirement, when it reads shared memory). With A in registers
// (a_in_regs), each thread leaves its fragment at issue and the rows of a warp are computed when
// that warp first retires the op, from B as read at the warpgroup's first retirement.
struct WgmmaOp {
    int type, n;
    uint64_t desc_a, desc_b;
    bool a_in_regs = false;
    std::vector<uint32_t> a_frag;  // [128 threads][4], a_in_regs only
    unsigned issued = 0;           // threads of the warpgroup that have issued it
    bool b_read = false;
    std::vector<double> b;         // [n][k]
    unsigned warps_done = 0;       // bit w: rows 16w..16w+15 of the product computed
    std::vector<double> product;   // [64][n]
    unsigned retired = 0;          // threads that have retired their share
};
struct WarpGroup {
    std::deque<WgmmaOp> ops;
    uint64_t base = 0;  // index of ops.front()
    // setmaxnreg: the registers per thread the warpgroup holds (0: the launch's allocation), the
    // count its threads are asking for, and how many have asked.
    unsigned regs = 0, asking = 0, asked = 0;
};

struct Thread {
    BlockState* block;
    sim_dim3 tid;
    unsigned linear, warp, lane;
    ThreadState state;
    int barrier_line;
    Fiber fiber;
    uint8_t* stack_lo;
    uint8_t* stack_hi;
    std::vector<CpAsyncOp> open_group;
    std::deque<std::vector<CpAsyncOp>> groups;
    // Warp-collective operands and results.
    uint64_t in_value, out_value;
    int in_arg, in_arg2;
    const void* in_ptr;
    unsigned in_regs[4], out_regs[4];
    float in_f[4], out_f[4];
    // mbarrier wait (hopper.cpp): the barrier and the parity of the phase awaited.
    const void* wait_bar;
    unsigned wait_parity;
    // wgmma: warpgroup-op indices issued by this thread, not yet committed / committed groups; the
    // op a wait_group is blocked on until every thread of the warpgroup has issued it.
    uint64_t wgmma_issued, wait_op;
    std::vector<WgmmaPart> wgmma_open;
    std::deque<std::vector<WgmmaPart>> wgmma_groups;
};

struct Warp {
    Collective kind;
    int line;
    unsigned mask, arrived;
    unsigned sync_epoch;  // collectives completed: orders intra-warp shared accesses
    int mode;
    unsigned exited;      // lanes that have finished the kernel
};

struct LaunchState;

struct BlockState {
    LaunchState* launch;
    const Function* fn;
    sim_dim3 bid;
    uint64_t linear;
    std::vector<Thread>* threads;
    std::vector<Warp> warps;
    unsigned nthreads;
    uint8_t* static_base;  // this worker's TLS block of the kernel's module (static __shared__)
    size_t static_size;
    uint8_t* dyn_base;  // dynamic shared memory of this block
    size_t dyn_size;
    uint32_t epoch;     // barrier interval (race detection)
    bool atomic_turn;   // all earlier blocks have finished: this block's global atomics may run
    std::map<uintptr_t, Mbarrier> mbarriers;  // by shared address
    std::vector<WarpGroup> warpgroups;
};

// Per OS worker thread (thread_local in exec.cpp).
struct Worker {
    BlockState* block = nullptr;
    Thread* current = nullptr;
    Fiber scheduler;
    uint32_t epoch_counter = 0;
};
Worker* worker();

// The CUDA thread running `instruction` (an emulated PTX instruction); outside a kernel, a report
// and abort (exec.cpp).
Thread* current_thread(const char* instruction);
// "0x…" for reports (access.cpp).
std::string hex(uintptr_t address);
// The value of an e4m3 code (NaN for the two NaN codes), exactly (hopper.cpp).
double e4m3_value(uint8_t code);
// One lane's four A registers of an mma into the warp's 16-row A tile (ptx.cpp): mma.sync
// m16n8k16 bf16 (`code` null) or m16n8k32 8-bit (`code` decodes a byte), and per warp the
// register-A fragments of wgmma, which share those layouts.
void mma_a_fragment(const unsigned regs[4], unsigned lane, double (*code)(uint8_t), double (*A)[32]);

// Stops the running kernel with a defect report (never returns when called on a fiber).
[[noreturn]] void fail(Result code, const std::string& what);
// "kernel K block (x,y,z) thread (x,y,z)" for reports.
std::string where();

// Blocks until this block may run global atomics (all earlier blocks finished).
void wait_atomic_turn();
// Lands every cp.async the thread has issued (at its end).
void cp_async_complete_all(Thread& t);
// A generation number that changes whenever device memory is freed (lookup caches).
uint64_t mem_generation();
// Whether `addr` lies in a loaded kernel module's image (its read-only constants).
bool in_module_image(uintptr_t addr);

// Hopper state (hopper.cpp). The scheduler wakes threads whose mbarrier phase has completed
// (landing the TMA copies of barriers that have all their arrivals); true if any woke, `error`
// set on a defect found while landing. On a
// deadlock, a description of what each waiting thread waits for; at the block's end, a
// description of TMA copies never waited for (empty when none).
bool wake_mbarrier_waiters(BlockState& b, std::string* error);
std::string mbarrier_waits(const BlockState& b);
std::string wgmma_waits(const BlockState& b);
std::string block_end_async_leftovers(const BlockState& b);
// Blocks the calling thread until the scheduler wakes it (exec.cpp).
void block_on_mbarrier(const void* bar, unsigned parity);
// Blocks the calling thread in wgmma.wait_group until its warpgroup has issued op `op` (exec.cpp).
void block_on_wgmma(uint64_t op);
// Switches to runnable thread `next` at once; the calling thread stays runnable and resumes in its
// turn of the sweep that goes on from `next` (exec.cpp).
void run_first(Thread* next);

// Shared-memory access bookkeeping (access.cpp).
void shared_access(uint8_t* p, size_t size, bool write, Thread* t, const char* what);
bool in_shared(const uint8_t* p, size_t size);
void check_global(const void* p, size_t size, bool write, const char* what);
void check_alignment(const void* p, size_t align, const char* what);
void shadow_begin_block(BlockState& b);
void cp_async_mark_inflight(uint8_t* p, size_t size, int delta);
// Whether any byte of [p, p + size) is being written by an asynchronous copy.
bool shared_inflight(const uint8_t* p, size_t size);
// An asynchronous-proxy write (a TMA copy landing): ordered by its mbarrier, not by __syncthreads,
// so the bytes start a fresh history for the race check.
void shared_async_written(uint8_t* p, size_t size);

// Warp collectives (exec.cpp): the calling lane deposits its operands in its Thread, arrives;
// the last lane to arrive runs `complete` for the warp; returns once results are in place.
void warp_collective(Collective kind, unsigned mask, int line, void (*complete)(BlockState&, Warp&, unsigned mask, unsigned first_lane));

}  // namespace sim
