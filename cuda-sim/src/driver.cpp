// The CUDA driver API entry points the backend reaches through cudarc's dynamic loading (symbols
// are looked up lazily, so this subset is enough). One device with the chosen profile, one
// primary context; every operation completes before its call returns, so streams, events and
// asynchronous copies are trivially ordered. Kernel faults are sticky, as on a GPU: the context
// reports the error until it is released and created again.
#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <memory>
#include <vector>
#include <set>
#include <unistd.h>

#include "../include/sim_tensor_map.h"
#include "runtime.h"

using namespace sim;

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;
typedef void* CUgraph;
typedef void* CUgraphExec;
typedef void* CUevent;
typedef void* CUmemoryPool;

namespace {

struct Context {
    int refs = 0;
    Result sticky = OK;
} g_ctx;
bool g_initialised = false;
thread_local CUcontext tl_current = nullptr;
std::mutex g_api_mu;  // one launch or module operation at a time
int g_dummy_handles[64];

CUresult fail_with(Result code, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    set_error_detail(code, std::string("cuda-sim: ") + buf);
    return code;
}

#define REQUIRE_INIT() \
    if (!g_initialised) return ERR_NOT_INITIALIZED
#define CHECK_STICKY() \
    if (g_ctx.sticky != OK) return g_ctx.sticky

// ---- CUDA graphs by stream capture ----
// Between cuStreamBeginCapture and cuStreamEndCapture, kernel launches, memsets, device copies and
// stream-ordered allocations and frees are recorded as graph nodes instead of run; cuGraphLaunch
// runs the nodes in order. Allocation nodes get their memory at capture (so the addresses the
// recorded launches use stay valid) and hold it while the graph lives: a launch finding a block
// of its own still live from the previous launch fails (as on a GPU, unless the graph was
// instantiated with AUTO_FREE_ON_LAUNCH). Synchronising calls during capture fail with
// STREAM_CAPTURE_UNSUPPORTED and invalidate it, as in the default (global) capture mode.
struct GraphNode {
    enum Kind { Kernel, Memset, CopyDtoD, Alloc, Free } kind;
    Function* fn = nullptr;
    sim_dim3 grid{}, block{};
    unsigned smem = 0;
    std::vector<std::vector<unsigned char>> params;  // each kernel argument's bytes
    uintptr_t dst = 0, src = 0;
    size_t n = 0;         // bytes (copies, allocations) or elements (memsets)
    unsigned value = 0;   // memset pattern
    int elem = 1;         // memset element bytes
};
// The memory of a graph's allocation nodes, freed with the last holder; a block that a launch
// left allocated (never freed in the graph nor after it) stays until cuMemFreeAsync frees it.
// Accessible only while `live` (held by a launch): any other access is reported.
struct GraphBlocks {
    std::vector<uintptr_t> ptrs;
    std::vector<char> live;
    void set_live(size_t i, bool on) {
        live[i] = on;
        mem_set_graph_idle(ptrs[i], !on);
    }
    ~GraphBlocks() {
        for (size_t i = 0; i < ptrs.size(); i++)
            if (!live[i]) mem_free(ptrs[i]);
    }
};
struct Graph {
    std::vector<GraphNode> nodes;
    std::shared_ptr<GraphBlocks> blocks = std::make_shared<GraphBlocks>();
};
struct GraphExec {
    std::vector<GraphNode> nodes;
    std::shared_ptr<GraphBlocks> blocks;
    bool auto_free = false;
};
struct Capture {
    Graph* graph = nullptr;  // non-null while capturing
    bool invalidated = false;
} g_capture;
std::vector<GraphExec*> g_graph_execs;  // instantiated graphs (their memory is found by address)

// A call that would synchronise (or run outside the stream) during capture: invalidates it.
CUresult refuse_in_capture(const char* what) {
    g_capture.invalidated = true;
    return fail_with(ERR_STREAM_CAPTURE_UNSUPPORTED, "%s while a stream is being captured (CUDA graphs)", what);
}
#define NOT_WHILE_CAPTURING(what) \
    if (g_capture.graph) return refuse_in_capture(what)

CUresult capture_memset(CUdeviceptr d, unsigned v, size_t n, int elem) {
    GraphNode node{GraphNode::Memset};
    node.dst = (uintptr_t)d, node.value = v, node.n = n, node.elem = elem;
    g_capture.graph->nodes.push_back(std::move(node));
    return OK;
}

// The index of a block owned by the capturing graph, or -1.
int graph_block(const GraphBlocks& b, uintptr_t p) {
    for (size_t i = 0; i < b.ptrs.size(); i++)
        if (b.ptrs[i] == p) return (int)i;
    return -1;
}

std::string target_for(const ImageInfo& img) {
    // The host build compiled with the same __CUDA_ARCH__ as the image: PTX for compute_80 and
    // the sm_80 cubin share one.
    std::string t = "sm_" + std::to_string(img.arch);
    if (img.arch_specific) t += "a";
    return t;
}

// FLUX2_SIM_PROFILE=1: at exit, the emulation time per kernel (where the emulator's time goes,
// not how fast a GPU would be).
std::mutex g_functions_mu;
std::vector<Function*> g_functions;
void print_profile() {
    std::lock_guard lock(g_functions_mu);
    std::vector<Function*> fs = g_functions;
    std::sort(fs.begin(), fs.end(), [](Function* a, Function* b) { return a->emulated_ns > b->emulated_ns; });
    fprintf(stderr, "cuda-sim profile: emulation seconds per kernel\n");
    for (Function* f : fs)
        if (f->launches)
            fprintf(stderr, "  %-32s %-7s %8llu launches %9.2f s\n", f->name.c_str(), f->target.c_str(),
                    (unsigned long long)f->launches.load(), f->emulated_ns.load() * 1e-9);
}
void track(Function* f) {
    static bool enabled = [] {
        const char* p = getenv("FLUX2_SIM_PROFILE");
        if (p && *p && strcmp(p, "0") != 0) {
            atexit(print_profile);
            return true;
        }
        return false;
    }();
    if (!enabled) return;
    std::lock_guard lock(g_functions_mu);
    g_functions.push_back(f);
}

void note_coverage(const Function& f) {
    static std::mutex mu;
    static std::set<std::string> seen;
    const char* path = getenv("FLUX2_SIM_COVERAGE");
    if (!path || !*path) return;
    std::lock_guard lock(mu);
    std::string line = f.target + " " + f.name + "\n";
    if (!seen.insert(line).second) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        ssize_t n = write(fd, line.data(), line.size());
        (void)n;
        close(fd);
    }
}

int regs_limited_threads(const Function& f) {
    if (f.image.regs <= 0) return 1024;
    int per_warp = ((f.image.regs * 32 + 255) / 256) * 256;
    return std::min(1024, (profile().regs_per_block / per_warp) * 32);
}

int default_max_dynamic(const Function& f) { return std::max(0, profile().smem_per_block - (int)f.image.static_smem); }

// Each result's name and the driver's text for it (cuGetErrorName, cuGetErrorString).
struct ErrorInfo {
    CUresult code;
    const char* name;
    const char* text;
};
const ErrorInfo ERRORS[] = {
    {OK, "CUDA_SUCCESS", "no error"},
    {ERR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {ERR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {ERR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {ERR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {ERR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {ERR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {ERR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {ERR_NO_BINARY_FOR_GPU, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {ERR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {ERR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {ERR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {ERR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {ERR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {ERR_ILLEGAL_INSTRUCTION, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"},
    {ERR_MISALIGNED_ADDRESS, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {ERR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {ERR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {ERR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {ERR_STREAM_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {ERR_STREAM_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
     "operation failed due to a previous error during capture"},
};
const ErrorInfo& error_info(CUresult e) {
    static const ErrorInfo unknown{ERR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"};
    for (const ErrorInfo& i : ERRORS)
        if (i.code == e) return i;
    return unknown;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) {
    profile();  // validates FLUX2_SIM_ARCH
    g_initialised = true;
    return OK;
}
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;  // driver 580 (CUDA 13.0)
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    const char* d = error_detail((Result)e);
    *s = d ? d : error_info(e).text;
    return OK;
}
// The driver's private tables (NVRTC asks for one when it finds libcuda): none here, which
// callers take as an old or absent driver.
CUresult cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return ERR_INVALID_VALUE;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = error_info(e).name;
    return OK;
}

// ---- device ----
CUresult cuDeviceGetCount(int* n) {
    REQUIRE_INIT();
    *n = 1;
    return OK;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    REQUIRE_INIT();
    if (ordinal != 0) return fail_with(ERR_INVALID_DEVICE, "device %d does not exist (the emulator has one)", ordinal);
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    if (len <= 0) return ERR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", device_name().c_str());
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = device_memory();
    return OK;
}
CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice) {
    memcpy(uuid, "flux2-cuda-sim\0\0", 16);
    uuid[15] = (unsigned char)(profile().major * 10 + profile().minor);
    return OK;
}
CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    const Profile& p = profile();
    switch (attr) {
        case 1: *v = 1024; break;                          // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;                  // MAX_BLOCK_DIM_X/Y
        case 4: *v = 64; break;                            // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;                    // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;                 // MAX_GRID_DIM_Y/Z
        case 8: *v = p.smem_per_block; break;              // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: *v = 65536; break;                         // TOTAL_CONSTANT_MEMORY
        case 10: *v = 32; break;                           // WARP_SIZE
        case 12: *v = p.regs_per_block; break;             // MAX_REGISTERS_PER_BLOCK
        case 13: *v = p.clock_khz; break;                  // CLOCK_RATE
        case 16: *v = p.sms; break;                        // MULTIPROCESSOR_COUNT
        case 18: *v = 0; break;                            // INTEGRATED
        case 31: *v = 1; break;                            // CONCURRENT_KERNELS
        case 36: *v = p.mem_clock_khz; break;              // MEMORY_CLOCK_RATE
        case 37: *v = p.bus_width_bits; break;             // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = p.l2_bytes; break;                   // L2_CACHE_SIZE
        case 39: *v = p.max_threads_per_sm; break;         // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: *v = 2; break;                            // ASYNC_ENGINE_COUNT
        case 41: *v = 1; break;                            // UNIFIED_ADDRESSING
        case 75: *v = p.major; break;                      // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = p.minor; break;                      // COMPUTE_CAPABILITY_MINOR
        case 81: *v = p.smem_per_sm; break;                // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: *v = p.regs_per_sm; break;                // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 83: *v = 1; break;                            // MANAGED_MEMORY
        case 97: *v = p.smem_per_block_optin; break;       // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: *v = p.max_threads_per_sm >= 2048 ? 32 : 24; break;  // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 111: *v = 1024; break;                        // RESERVED_SHARED_MEMORY_PER_BLOCK
        case 115: *v = 1; break;                           // MEMORY_POOLS_SUPPORTED
        default: *v = 0; break;
    }
    return OK;
}

// ---- context ----
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    REQUIRE_INIT();
    if (d != 0) return ERR_INVALID_DEVICE;
    std::lock_guard lock(g_api_mu);
    g_ctx.refs++;
    *c = &g_ctx;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) {
    std::lock_guard lock(g_api_mu);
    if (g_ctx.refs > 0 && --g_ctx.refs == 0) g_ctx.sticky = OK;  // a new context starts clean
    return OK;
}
CUresult cuDevicePrimaryCtxReset_v2(CUdevice) {
    std::lock_guard lock(g_api_mu);
    g_ctx.sticky = OK;
    return OK;
}
CUresult cuDevicePrimaryCtxGetState(CUdevice, unsigned* flags, int* active) {
    *flags = 0;
    *active = g_ctx.refs > 0;
    return OK;
}
CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice, unsigned) { return OK; }
CUresult cuCtxSetCurrent(CUcontext c) {
    tl_current = c;
    return OK;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = tl_current;
    return OK;
}
CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = tl_current;
    return OK;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return OK;
}
CUresult cuCtxSynchronize() {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("cuCtxSynchronize");
    return OK;
}
CUresult cuCtxGetLimit(size_t* v, int) {
    *v = 0;
    return OK;
}
CUresult cuCtxSetLimit(int, size_t) { return OK; }
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return OK;
}
CUresult cuCtxSetCacheConfig(int) { return OK; }
CUresult cuCtxGetCacheConfig(int* c) {
    *c = 0;
    return OK;
}
CUresult cuCtxSetFlags(unsigned) { return OK; }
CUresult cuCtxGetApiVersion(CUcontext, unsigned* v) {
    *v = 12080;
    return OK;
}

// ---- memory ----
CUresult alloc_device(CUdeviceptr* p, size_t bytes) {
    REQUIRE_INIT();
    CHECK_STICKY();
    uintptr_t a = 0;
    Result r = mem_alloc(bytes, &a);
    if (r != OK)
        return fail_with(r, "out of memory: %zu bytes requested, %zu of %zu in use (FLUX2_SIM_MEMORY sets the size)", bytes,
                         mem_used(), device_memory());
    *p = a;
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    NOT_WHILE_CAPTURING("cuMemAlloc (synchronous)");
    return alloc_device(p, bytes);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) {
    if (!g_capture.graph) return alloc_device(p, bytes);
    if (CUresult r = alloc_device(p, bytes); r != OK) return r;
    GraphBlocks& b = *g_capture.graph->blocks;
    b.ptrs.push_back((uintptr_t)*p);
    b.live.push_back(1);  // allocated in the capture's order of events; no eager work can reach it
    mem_set_graph_idle((uintptr_t)*p, true);
    GraphNode node{GraphNode::Alloc};
    node.dst = (uintptr_t)*p;
    node.n = bytes;
    g_capture.graph->nodes.push_back(std::move(node));
    return OK;
}
CUresult cuMemAllocFromPoolAsync(CUdeviceptr* p, size_t bytes, CUmemoryPool, CUstream s) { return cuMemAllocAsync(p, bytes, s); }
CUresult cuMemFree_v2(CUdeviceptr p) {
    if (!p) return OK;
    NOT_WHILE_CAPTURING("cuMemFree (synchronous)");
    if (mem_free((uintptr_t)p) != OK) return fail_with(ERR_INVALID_VALUE, "cuMemFree of 0x%llx, which is not a live allocation", p);
    return OK;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) {
    if (!p) return OK;
    if (g_capture.graph) {
        GraphNode node{GraphNode::Free};
        node.dst = (uintptr_t)p;
        int i = graph_block(*g_capture.graph->blocks, (uintptr_t)p);
        if (i >= 0) g_capture.graph->blocks->live[i] = 0;
        g_capture.graph->nodes.push_back(std::move(node));
        return OK;
    }
    // Memory a graph allocated: freed until its next launch; the block stays with the graph.
    for (GraphExec* e : g_graph_execs) {
        int i = graph_block(*e->blocks, (uintptr_t)p);
        if (i < 0) continue;
        if (!e->blocks->live[i]) return fail_with(ERR_INVALID_VALUE, "cuMemFreeAsync of 0x%llx, graph memory already freed", p);
        e->blocks->set_live(i, false);
        return OK;
    }
    return cuMemFree_v2(p);
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    size_t used = mem_used(), all = device_memory();
    *free_bytes = all > used ? all - used : 0;
    *total = all;
    return OK;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = malloc(bytes ? bytes : 1);
    return *p ? OK : ERR_OUT_OF_MEMORY;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    free(p);
    return OK;
}
CUresult cuMemHostRegister_v2(void*, size_t, unsigned) { return OK; }
CUresult cuMemHostUnregister(void*) { return OK; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("a host-to-device copy");
    if (Result r = mem_check_range((uintptr_t)dst, n, "host-to-device copy destination"); r != OK) return r;
    if (n) memcpy((void*)(uintptr_t)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("a device-to-host copy");
    if (Result r = mem_check_range((uintptr_t)src, n, "device-to-host copy source"); r != OK) return r;
    if (n) memcpy(dst, (void*)(uintptr_t)src, n);
    return OK;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("a synchronous device-to-device copy");
    if (Result r = mem_check_range((uintptr_t)dst, n, "device-to-device copy destination"); r != OK) return r;
    if (Result r = mem_check_range((uintptr_t)src, n, "device-to-device copy source"); r != OK) return r;
    if (n) memmove((void*)(uintptr_t)dst, (void*)(uintptr_t)src, n);
    return OK;
}
// Host copies are not captured: the emulator does not track page-locked memory, and the engine
// never copies from the host inside a captured step.
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, CUstream) {
    NOT_WHILE_CAPTURING("a host-to-device copy (host memory in a graph is not emulated)");
    return cuMemcpyHtoD_v2(d, s, n);
}
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, CUstream) {
    NOT_WHILE_CAPTURING("a device-to-host copy (host memory in a graph is not emulated)");
    return cuMemcpyDtoH_v2(d, s, n);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) {
    if (!g_capture.graph) return cuMemcpyDtoD_v2(d, s, n);
    GraphNode node{GraphNode::CopyDtoD};
    node.dst = (uintptr_t)d, node.src = (uintptr_t)s, node.n = n;
    g_capture.graph->nodes.push_back(std::move(node));
    return OK;
}
CUresult cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream st) { return cuMemcpyDtoDAsync_v2(d, s, n, st); }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("a synchronous memset");
    if (Result r = mem_check_range((uintptr_t)d, n, "memset"); r != OK) return r;
    memset((void*)(uintptr_t)d, v, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) {
    if (!g_capture.graph) return cuMemsetD8_v2(d, v, n);
    return capture_memset(d, v, n, 1);
}
CUresult cuMemsetD16_v2(CUdeviceptr d, unsigned short v, size_t n) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("a synchronous memset");
    if (Result r = mem_check_range((uintptr_t)d, n * 2, "memset"); r != OK) return r;
    for (size_t i = 0; i < n; i++) memcpy((char*)(uintptr_t)d + 2 * i, &v, 2);
    return OK;
}
CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, CUstream) {
    if (!g_capture.graph) return cuMemsetD16_v2(d, v, n);
    return capture_memset(d, v, n, 2);
}
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("a synchronous memset");
    if (Result r = mem_check_range((uintptr_t)d, n * 4, "memset"); r != OK) return r;
    for (size_t i = 0; i < n; i++) memcpy((char*)(uintptr_t)d + 4 * i, &v, 4);
    return OK;
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) {
    if (!g_capture.graph) return cuMemsetD32_v2(d, v, n);
    return capture_memset(d, v, n, 4);
}
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice) {
    *pool = &g_dummy_handles[0];
    return OK;
}
CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }
CUresult cuDeviceSetMemPool(CUdevice, CUmemoryPool) { return OK; }
CUresult cuMemPoolSetAttribute(CUmemoryPool, int, void*) { return OK; }
CUresult cuMemPoolGetAttribute(CUmemoryPool, int, void* v) {
    memset(v, 0, 8);
    return OK;
}
CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return OK; }
CUresult cuDeviceGraphMemTrim(CUdevice) { return OK; }  // graph memory is freed with its graph

// ---- streams and events (every operation has completed when its call returns) ----
CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = &g_dummy_handles[1];
    return OK;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(CUstream) { return OK; }
CUresult cuStreamSynchronize(CUstream) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("cuStreamSynchronize");
    return OK;
}
CUresult cuStreamQuery(CUstream) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("cuStreamQuery");
    return OK;
}
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return OK; }
CUresult cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    if (g_capture.graph) return fail_with(ERR_NOT_SUPPORTED, "host functions in a captured graph are not emulated");
    fn(data);
    return OK;
}
CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = new double(0);
    return OK;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    *(double*)e = now_ms();
    return OK;
}
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(CUevent) {
    CHECK_STICKY();
    NOT_WHILE_CAPTURING("cuEventSynchronize");
    return OK;
}
CUresult cuEventQuery(CUevent) { return OK; }
CUresult cuEventDestroy_v2(CUevent e) {
    delete (double*)e;
    return OK;
}
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    *ms = (float)(*(double*)b - *(double*)a);
    return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

// ---- TMA tensor maps: the driver's checks, then the emulator's encoding (sim_tensor_map.h) ----
CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* address, const uint64_t* dims,
                                const uint64_t* strides, const unsigned* box, const unsigned* element_strides,
                                int interleave, int swizzle, int l2_promotion, int oob_fill) {
    static const int sizes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4};
    const char* f = "cuTensorMapEncodeTiled";
    if (!map || (uintptr_t)map % 64) return fail_with(ERR_INVALID_VALUE, "%s: the map must be 64-byte aligned", f);
    if (dtype < 0 || dtype > 12) return fail_with(ERR_INVALID_VALUE, "%s: data type %d is not emulated", f, dtype);
    if (rank < 1 || rank > 5) return fail_with(ERR_INVALID_VALUE, "%s: rank %u outside 1..5", f, rank);
    if (interleave != 0) return fail_with(ERR_NOT_SUPPORTED, "%s: interleaved layouts are not emulated", f);
    if (swizzle < 0 || swizzle > 3) return fail_with(ERR_INVALID_VALUE, "%s: swizzle %d is not a CUtensorMapSwizzle", f, swizzle);
    if (oob_fill < 0 || oob_fill > 1 || l2_promotion < 0 || l2_promotion > 3)
        return fail_with(ERR_INVALID_VALUE, "%s: invalid out-of-bounds fill or L2 promotion", f);
    if ((uintptr_t)address % 16) return fail_with(ERR_INVALID_VALUE, "%s: the global address must be 16-byte aligned", f);
    const unsigned es = (unsigned)sizes[dtype];
    sim_tensor_map m{};
    m.magic = SIM_TENSOR_MAP_MAGIC;
    m.rank = (uint8_t)rank;
    m.elem_size = (uint8_t)es;
    m.swizzle = (uint8_t)swizzle;
    m.oob_nan = (uint8_t)oob_fill;
    m.address = (uint64_t)(uintptr_t)address;
    uint64_t extent = es;
    for (unsigned i = 0; i < rank; i++) {
        if (dims[i] == 0 || dims[i] > (1ull << 32))
            return fail_with(ERR_INVALID_VALUE, "%s: globalDim[%u] = %llu outside 1..2^32", f, i, (unsigned long long)dims[i]);
        if (box[i] == 0 || box[i] > 256) return fail_with(ERR_INVALID_VALUE, "%s: boxDim[%u] = %u outside 1..256", f, i, box[i]);
        if (element_strides[i] < 1 || element_strides[i] > 8)
            return fail_with(ERR_INVALID_VALUE, "%s: elementStrides[%u] = %u outside 1..8", f, i, element_strides[i]);
        if (element_strides[i] != 1) return fail_with(ERR_NOT_SUPPORTED, "%s: element strides other than 1 are not emulated", f);
        m.dims[i] = dims[i];
        m.box[i] = (uint16_t)box[i];
        m.element_strides[i] = (uint8_t)element_strides[i];
        if (i + 1 < rank) {
            uint64_t st = strides[i];
            if (st % 16 || st >= (1ull << 40))
                return fail_with(ERR_INVALID_VALUE, "%s: globalStrides[%u] = %llu is not a multiple of 16 below 2^40", f, i,
                                 (unsigned long long)st);
            if (st < extent * dims[i])
                return fail_with(ERR_INVALID_VALUE, "%s: globalStrides[%u] = %llu is smaller than the dimension below it", f, i,
                                 (unsigned long long)st);
            m.strides[i] = st;
            extent = st;
        }
    }
    const unsigned inner = box[0] * es;
    if (inner % 16) return fail_with(ERR_INVALID_VALUE, "%s: the box's inner dimension (%u bytes) is not a multiple of 16", f, inner);
    const unsigned span = swizzle == 3 ? 128 : swizzle == 2 ? 64 : swizzle == 1 ? 32 : 0;
    if (span && inner > span)
        return fail_with(ERR_INVALID_VALUE, "%s: the box's inner dimension (%u bytes) exceeds the %u-byte swizzle", f, inner, span);
    memset(map, 0, 128);
    memcpy(map, &m, sizeof m);
    return OK;
}

// ---- modules and functions ----
CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    REQUIRE_INIT();
    CHECK_STICKY();
    std::lock_guard lock(g_api_mu);
    auto* m = new Module;
    std::string err;
    if (!parse_image(image, m->info, err)) {
        delete m;
        return fail_with(ERR_INVALID_IMAGE, "cuModuleLoadData: %s", err.c_str());
    }
    const Profile& p = profile();
    if (!image_runs_on(m->info, p.major, p.minor)) {
        std::string t = target_for(m->info) + (m->info.is_ptx ? " PTX" : " cubin");
        delete m;
        return fail_with(ERR_NO_BINARY_FOR_GPU, "a %s image does not run on the %s profile (compute capability %d.%d)",
                         t.c_str(), p.arch, p.major, p.minor);
    }
    m->target = target_for(m->info);
    for (const KernelImageInfo& k : m->info.kernels) {
        std::string why;
        const HostKernel* host = host_kernel(m->target, k.name, &why);
        if (!host) {
            delete m;
            return fail_with(ERR_INVALID_IMAGE, "%s", why.c_str());
        }
        auto* f = new Function;
        f->name = k.name;
        f->target = m->target;
        f->image = k;
        f->image_arch = m->info.arch;
        f->image_arch_specific = m->info.arch_specific;
        f->host = host;
        f->max_dynamic_smem = default_max_dynamic(*f);
        m->functions.push_back(f);
        track(f);
    }
    *out = m;
    return OK;
}
CUresult cuModuleLoadDataEx(CUmodule* out, const void* image, unsigned, void*, void**) { return cuModuleLoadData(out, image); }
CUresult cuModuleUnload(CUmodule) { return OK; }  // functions stay valid: handles may outlive it in cudarc
CUresult cuModuleGetFunction(CUfunction* out, CUmodule mod, const char* name) {
    Module* m = (Module*)mod;
    if (!m) return ERR_INVALID_HANDLE;
    for (Function* f : m->functions)
        if (f->name == name) {
            *out = f;
            return OK;
        }
    std::string entries;
    for (Function* f : m->functions) entries += (entries.empty() ? "" : ", ") + f->name;
    return fail_with(ERR_NOT_FOUND, "kernel %s is not in the loaded %s image (its entries: %s)", name, m->target.c_str(),
                     entries.c_str());
}
CUresult cuModuleGetGlobal_v2(CUdeviceptr*, size_t*, CUmodule, const char* name) {
    return fail_with(ERR_NOT_FOUND, "module globals (%s) are not emulated", name);
}
CUresult cuFuncSetAttribute(CUfunction fn, int attr, int value) {
    Function* f = (Function*)fn;
    if (!f) return ERR_INVALID_HANDLE;
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        int limit = profile().smem_per_block_optin - (int)f->image.static_smem;
        if (value < 0 || value > limit)
            return fail_with(ERR_INVALID_VALUE, "%s: %d bytes of dynamic shared memory exceed the %s limit (%d opt-in - %u static)",
                             f->name.c_str(), value, profile().arch, profile().smem_per_block_optin, f->image.static_smem);
        f->max_dynamic_smem = value;
    }
    return OK;
}
CUresult cuFuncGetAttribute(int* v, int attr, CUfunction fn) {
    Function* f = (Function*)fn;
    if (!f) return ERR_INVALID_HANDLE;
    switch (attr) {
        case 0: *v = f->image.max_threads ? std::min<int>((int)f->image.max_threads, regs_limited_threads(*f)) : regs_limited_threads(*f); break;
        case 1: *v = (int)f->image.static_smem; break;
        case 2: *v = 0; break;
        case 3: *v = (int)f->image.local_bytes; break;
        case 4: *v = f->image.regs > 0 ? f->image.regs : 0; break;
        case 5: *v = 80; break;
        case 6: *v = f->image_arch; break;
        case 8: *v = f->max_dynamic_smem; break;
        default: *v = 0; break;
    }
    return OK;
}
CUresult cuFuncSetCacheConfig(CUfunction, int) { return OK; }
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, CUfunction fn, int block_size, size_t dyn) {
    Function* f = (Function*)fn;
    const Profile& p = profile();
    int by_threads = p.max_threads_per_sm / std::max(1, block_size);
    size_t smem = f->image.static_smem + dyn + 1024;
    int by_smem = (int)(p.smem_per_sm / smem);
    int by_regs = 64;
    if (f->image.regs > 0) {
        int warps = (block_size + 31) / 32, per_warp = ((f->image.regs * 32 + 255) / 256) * 256;
        by_regs = p.regs_per_sm / (per_warp * warps);
    }
    *blocks = std::max(0, std::min({by_threads, by_smem, by_regs, 32}));
    return OK;
}
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* b, CUfunction f, int bs, size_t dyn, unsigned) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(b, f, bs, dyn);
}

// Runs one launch whose configuration has been checked (a direct one, or a graph's kernel node).
static CUresult run_launch(Function* f, sim_dim3 grid, sim_dim3 block, unsigned smem, void** params) {
    note_coverage(*f);
    f->launches++;
    std::lock_guard lock(g_api_mu);
    double start = now_ms();
    Result r = launch(LaunchConfig{f, grid, block, smem, params});
    f->emulated_ns += (uint64_t)((now_ms() - start) * 1e6);
    if (r != OK) g_ctx.sticky = r;
    return r;
}
CUresult cuLaunchKernel(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream, void** params, void** extra) {
    REQUIRE_INIT();
    CHECK_STICKY();
    Function* f = (Function*)fn;
    if (!f) return ERR_INVALID_HANDLE;
    const char* k = f->name.c_str();
    if (extra) return fail_with(ERR_NOT_SUPPORTED, "%s: kernel arguments through `extra` are not emulated", k);
    if (!gx || !gy || !gz || !bx || !by || !bz)
        return fail_with(ERR_INVALID_VALUE, "%s: empty launch grid (%u,%u,%u) x block (%u,%u,%u)", k, gx, gy, gz, bx, by, bz);
    if (bx > 1024 || by > 1024 || bz > 64 || (uint64_t)bx * by * bz > 1024)
        return fail_with(ERR_INVALID_VALUE, "%s: block (%u,%u,%u) exceeds the limits (1024 threads; x, y <= 1024, z <= 64)", k, bx, by, bz);
    if (gx > 2147483647u || gy > 65535 || gz > 65535)
        return fail_with(ERR_INVALID_VALUE, "%s: grid (%u,%u,%u) exceeds the limits (x < 2^31, y, z <= 65535)", k, gx, gy, gz);
    unsigned threads = bx * by * bz;
    if (f->image.max_threads && threads > f->image.max_threads)
        return fail_with(ERR_LAUNCH_OUT_OF_RESOURCES, "%s: %u threads per block exceed its __launch_bounds__ of %u", k, threads,
                         f->image.max_threads);
    if ((int)threads > regs_limited_threads(*f))
        return fail_with(ERR_LAUNCH_OUT_OF_RESOURCES, "%s: %u threads x %d registers exceed the %d registers of a block", k, threads,
                         f->image.regs, profile().regs_per_block);
    if ((int)smem > f->max_dynamic_smem) {
        if (f->image.static_smem + smem > (unsigned)profile().smem_per_block && f->max_dynamic_smem == default_max_dynamic(*f))
            return fail_with(ERR_INVALID_VALUE,
                             "%s: %u bytes of dynamic shared memory (+%u static) need the opt-in attribute "
                             "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES above %d bytes",
                             k, smem, f->image.static_smem, profile().smem_per_block);
        return fail_with(ERR_INVALID_VALUE, "%s: %u bytes of dynamic shared memory exceed the kernel's attribute (%d bytes)", k,
                         smem, f->max_dynamic_smem);
    }
    if (f->image.static_smem + smem > (unsigned)profile().smem_per_block_optin)
        return fail_with(ERR_INVALID_VALUE, "%s: %u bytes of shared memory exceed the %s limit of %d per block", k,
                         f->image.static_smem + smem, profile().arch, profile().smem_per_block_optin);
    if (g_capture.graph) {  // recorded with a copy of its arguments, run by cuGraphLaunch
        GraphNode node{GraphNode::Kernel};
        node.fn = f, node.grid = {gx, gy, gz}, node.block = {bx, by, bz}, node.smem = smem;
        for (int i = 0; i < f->host->param_count; i++) {
            const unsigned char* p = (const unsigned char*)params[i];
            node.params.emplace_back(p, p + f->host->param_sizes[i]);
        }
        g_capture.graph->nodes.push_back(std::move(node));
        return OK;
    }
    return run_launch(f, {gx, gy, gz}, {bx, by, bz}, smem, params);
}

// ---- CUDA graphs (see GraphNode) ----
CUresult cuStreamBeginCapture_v2(CUstream s, int) {
    REQUIRE_INIT();
    CHECK_STICKY();
    // As on a GPU: the legacy default stream (0, or CU_STREAM_LEGACY) synchronises with every
    // blocking stream and cannot be captured.
    if (s == nullptr || s == (CUstream)0x1)
        return fail_with(ERR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture on the legacy default stream (capture needs a stream of its own)");
    if (g_capture.graph) return fail_with(ERR_ILLEGAL_STATE, "cuStreamBeginCapture: a capture is already under way");
    g_capture.graph = new Graph;
    g_capture.invalidated = false;
    return OK;
}
CUresult cuStreamEndCapture(CUstream, CUgraph* out) {
    *out = nullptr;
    if (!g_capture.graph) return fail_with(ERR_ILLEGAL_STATE, "cuStreamEndCapture without cuStreamBeginCapture");
    Graph* g = g_capture.graph;
    g_capture.graph = nullptr;
    if (g_capture.invalidated) {
        g_capture.invalidated = false;
        delete g;
        return fail_with(ERR_STREAM_CAPTURE_INVALIDATED,
                         "cuStreamEndCapture: an operation not permitted during capture invalidated it (the earlier error says which)");
    }
    *out = (CUgraph)g;
    return OK;
}
CUresult cuStreamIsCapturing(CUstream, int* status) {
    *status = g_capture.graph ? (g_capture.invalidated ? 2 : 1) : 0;  // NONE, ACTIVE, INVALIDATED
    return OK;
}
CUresult cuGraphInstantiateWithFlags(CUgraphExec* out, CUgraph graph, unsigned long long flags) {
    if (!graph) return ERR_INVALID_VALUE;
    const Graph& g = *(const Graph*)graph;
    // Until it is launched, none of the graph's allocations exists.
    for (size_t i = 0; i < g.blocks->ptrs.size(); i++) g.blocks->set_live(i, false);
    GraphExec* e = new GraphExec{g.nodes, g.blocks, (flags & 1) != 0};  // 1: AUTO_FREE_ON_LAUNCH
    g_graph_execs.push_back(e);
    *out = (CUgraphExec)e;
    return OK;
}
CUresult cuGraphUpload(CUgraphExec, CUstream) { return OK; }
CUresult cuGraphLaunch(CUgraphExec exec, CUstream) {
    REQUIRE_INIT();
    CHECK_STICKY();
    if (g_capture.graph) return fail_with(ERR_NOT_SUPPORTED, "cuGraphLaunch inside a capture (a child graph) is not emulated");
    GraphExec& e = *(GraphExec*)exec;
    GraphBlocks& b = *e.blocks;
    for (const GraphNode& n : e.nodes) {
        if (n.kind != GraphNode::Alloc) continue;
        int i = graph_block(b, n.dst);
        if (b.live[i] && !e.auto_free)
            return fail_with(ERR_INVALID_VALUE,
                             "cuGraphLaunch: 0x%llx, allocated by the graph's previous launch, was not freed (free it first, or "
                             "instantiate with CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)",
                             (unsigned long long)n.dst);
    }
    for (const GraphNode& n : e.nodes) {
        CUresult r = OK;
        switch (n.kind) {
            case GraphNode::Kernel: {
                std::vector<void*> params;
                for (const auto& p : n.params) params.push_back((void*)p.data());
                r = run_launch(n.fn, n.grid, n.block, n.smem, params.data());
                break;
            }
            case GraphNode::Memset:
                r = n.elem == 1   ? cuMemsetD8_v2(n.dst, (unsigned char)n.value, n.n)
                    : n.elem == 2 ? cuMemsetD16_v2(n.dst, (unsigned short)n.value, n.n)
                                  : cuMemsetD32_v2(n.dst, n.value, n.n);
                break;
            case GraphNode::CopyDtoD: r = cuMemcpyDtoD_v2(n.dst, n.src, n.n); break;
            case GraphNode::Alloc: b.set_live(graph_block(b, n.dst), true); break;
            case GraphNode::Free: {
                int i = graph_block(b, n.dst);
                if (i >= 0)
                    b.set_live(i, false);
                else
                    r = cuMemFree_v2(n.dst);  // memory from outside the graph: gone after the first launch
                break;
            }
        }
        if (r != OK) return r;
    }
    return OK;
}
CUresult cuGraphExecDestroy(CUgraphExec exec) {
    auto it = std::find(g_graph_execs.begin(), g_graph_execs.end(), (GraphExec*)exec);
    if (it == g_graph_execs.end()) return ERR_INVALID_VALUE;
    g_graph_execs.erase(it);
    delete (GraphExec*)exec;
    return OK;
}
CUresult cuGraphDestroy(CUgraph graph) {
    delete (Graph*)graph;
    return OK;
}

}  // extern "C"
