// The access checks. Kernel modules are compiled with -fsanitize=thread, which makes the
// compiler call __tsan_readN/__tsan_writeN before every load and store the kernel makes; the
// emulator implements those hooks (no ThreadSanitizer runtime is linked) to check each access:
// shared memory for races between barriers and for bytes a cp.async is still writing, global
// memory against the live allocations, and the alignment of every access.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "runtime.h"

namespace sim {
namespace {

// Per shared byte, for the current barrier interval (`epoch`): the last writer and the readers
// since, with the warp-collective count at the time (intra-warp order comes from collectives).
struct Cell {
    uint32_t epoch;
    uint16_t writer;  // thread + 1, 0 none
    uint16_t reader;  // thread + 1; READERS_WARP | warp for several in one warp; READERS_MANY
    uint32_t wsync, rsync;
};
constexpr uint16_t READERS_WARP = 0x8000;
constexpr uint16_t READERS_MANY = 0xffff;

thread_local std::vector<Cell> tl_shadow;
thread_local std::vector<uint8_t> tl_inflight;
// The allocations this worker touched last: kernels alternate between a few buffers, and a
// hit here saves the locked map lookup.
constexpr int RECENT = 8;
thread_local Allocation tl_recent[RECENT];
thread_local uint64_t tl_recent_gen = 0;
thread_local unsigned tl_recent_next = 0;

std::string thread_name(const BlockState& b, unsigned linear) {
    const Thread& t = (*b.threads)[linear];
    char buf[48];
    snprintf(buf, sizeof buf, "(%u,%u,%u)", t.tid.x, t.tid.y, t.tid.z);
    return buf;
}

// Shadow index of a shared address, or -1.
long shared_offset(const BlockState& b, const uint8_t* p, size_t size) {
    uintptr_t a = (uintptr_t)p;
    if (a - (uintptr_t)b.static_base < b.static_size) {
        if (a - (uintptr_t)b.static_base + size > b.static_size) return -2;
        return (long)(a - (uintptr_t)b.static_base);
    }
    if (a - (uintptr_t)b.dyn_base < b.dyn_size) {
        if (a - (uintptr_t)b.dyn_base + size > b.dyn_size) return -2;
        return (long)(b.static_size + (a - (uintptr_t)b.dyn_base));
    }
    return -1;
}

std::string describe_shared(const BlockState& b, long off) {
    if ((size_t)off < b.static_size) return "static shared offset " + std::to_string(off);
    return "dynamic shared offset " + std::to_string(off - (long)b.static_size);
}

// `others` names who touched the bytes before: "thread (x,y,z) wrote", "threads of warp 3 read".
[[noreturn]] void race(const BlockState& b, Thread* t, bool write, size_t size, long off, const std::string& others,
                       const char* what) {
    std::string msg = std::string("shared-memory race: thread ") + thread_name(b, t->linear) + (write ? " writes " : " reads ") +
                      std::to_string(size) + " bytes (" + what + ") at " + describe_shared(b, off) + ", which " + others +
                      " since the last __syncthreads (a barrier must separate them)";
    fail(ERR_LAUNCH_FAILED, msg);
}

// Whether an access by thread `other` (recorded at warp-collective count `sync`) is ordered
// before now for thread t: only through a warp collective both took part in since.
inline bool ordered(const BlockState& b, const Thread* t, unsigned other, uint32_t sync) {
    return other / 32 == t->warp && sync < b.warps[t->warp].sync_epoch;
}

}  // namespace

std::string hex(uintptr_t a) {
    char b[32];
    snprintf(b, sizeof b, "0x%" PRIxPTR, a);
    return b;
}

void shadow_begin_block(BlockState& b) {
    size_t n = b.static_size + b.dyn_size;
    if (tl_shadow.size() < n) tl_shadow.resize(n, Cell{0, 0, 0, 0, 0});
    if (tl_inflight.size() < n) tl_inflight.resize(n);
    memset(tl_inflight.data(), 0, n);  // a failed block may have left copies in flight
}

bool in_shared(const uint8_t* p, size_t size) {
    Worker* w = worker();
    return w->block && shared_offset(*w->block, p, size) >= 0;
}

void cp_async_mark_inflight(uint8_t* p, size_t size, int delta) {
    BlockState& b = *worker()->block;
    long off = shared_offset(b, p, size);
    for (size_t i = 0; i < size; i++) tl_inflight[off + i] = (uint8_t)(tl_inflight[off + i] + delta);
}

bool shared_inflight(const uint8_t* p, size_t size) {
    BlockState& b = *worker()->block;
    long off = shared_offset(b, p, size);
    if (off < 0) return false;
    for (size_t i = 0; i < size; i++)
        if (tl_inflight[off + i]) return true;
    return false;
}

void shared_async_written(uint8_t* p, size_t size) {
    BlockState& b = *worker()->block;
    long off = shared_offset(b, p, size);
    for (size_t i = 0; i < size; i++) tl_shadow[off + i] = Cell{b.epoch, 0, 0, 0, 0};
}

void shared_access(uint8_t* p, size_t size, bool write, Thread* t, const char* what) {
    BlockState& b = *t->block;
    long off = shared_offset(b, p, size);
    if (off < 0) fail(ERR_ILLEGAL_ADDRESS, std::string(what) + " at " + hex((uintptr_t)p) + " is not in this block's shared memory");
    const uint16_t me = (uint16_t)(t->linear + 1);
    const uint32_t sync = b.warps[t->warp].sync_epoch;
    for (size_t i = 0; i < size; i++) {
        if (tl_inflight[off + i])
            fail(ERR_LAUNCH_FAILED, std::string(what) + (write ? " writes " : " reads ") + describe_shared(b, off + (long)i) +
                                        ", which an asynchronous copy is still writing (cp.async: cp.async.wait_group first, then a "
                                        "barrier; TMA: wait on its mbarrier first)");
        Cell& c = tl_shadow[off + i];
        if (c.epoch != b.epoch) c = Cell{b.epoch, 0, 0, 0, 0};
        if (c.writer && c.writer != me && !ordered(b, t, c.writer - 1u, c.wsync))
            race(b, t, write, size, off, "thread " + thread_name(b, c.writer - 1u) + " wrote", what);
        if (write) {
            // (Several readers are recorded by warp, not by thread: the report names the warp.)
            if (c.reader == READERS_MANY) race(b, t, true, size, off, "threads of several warps read", what);
            if (c.reader & READERS_WARP) {
                unsigned warp = c.reader & 0x7fff;
                if (warp != t->warp || c.rsync >= sync)
                    race(b, t, true, size, off, "threads of warp " + std::to_string(warp) + " read", what);
            } else if (c.reader && c.reader != me && !ordered(b, t, c.reader - 1u, c.rsync)) {
                race(b, t, true, size, off, "thread " + thread_name(b, c.reader - 1u) + " read", what);
            }
            c.writer = me;
            c.wsync = sync;
            c.reader = 0;
        } else if (c.reader == 0) {
            c.reader = me;
            c.rsync = sync;
        } else if (c.reader != me) {
            unsigned prev_warp = (c.reader & READERS_WARP) ? (c.reader & 0x7fffu) : (c.reader - 1u) / 32;
            c.reader = c.reader == READERS_MANY || prev_warp != t->warp ? READERS_MANY : (uint16_t)(READERS_WARP | t->warp);
            c.rsync = c.rsync > sync ? c.rsync : sync;
        }
    }
}

void check_alignment(const void* p, size_t align, const char* what) {
    if ((uintptr_t)p % align)
        fail(ERR_MISALIGNED_ADDRESS, std::string(what) + " at " + hex((uintptr_t)p) + " is not aligned to " +
                                         std::to_string(align) + " bytes");
}

void check_global(const void* p, size_t size, bool write, const char* what) {
    uintptr_t a = (uintptr_t)p;
    uint64_t gen = mem_generation();
    if (gen != tl_recent_gen) {
        for (Allocation& r : tl_recent) r = Allocation{0, 0, 0};
        tl_recent_gen = gen;
    }
    for (const Allocation& r : tl_recent)
        if (a - r.base < r.size && a - r.base + size <= r.size) return;
    Allocation found;
    std::string why;
    if (mem_find(a, size, &found, &why)) {
        tl_recent[tl_recent_next++ % RECENT] = found;
        return;
    }
    if (!write && in_module_image(a)) return;  // the module's own constants
    BlockState& b = *worker()->block;
    if (a - (uintptr_t)b.dyn_base < b.dyn_size + 4096 && a >= (uintptr_t)b.dyn_base)
        why = std::to_string(a + size - ((uintptr_t)b.dyn_base + b.dyn_size)) + " bytes past the end of the block's " +
              std::to_string(b.dyn_size) + " bytes of dynamic shared memory";
    fail(ERR_ILLEGAL_ADDRESS, std::string(what) + (write ? ": write of " : ": read of ") + std::to_string(size) +
                                  " bytes at " + hex(a) + ", " + why);
}

// One kernel access, from the instrumentation hooks.
static inline void access(void* p, size_t size, bool write) {
    Worker* w = worker();
    Thread* t = w->current;
    if (!t) return;  // module initialisers and other code outside a kernel
    uintptr_t a = (uintptr_t)p;
    if (a - (uintptr_t)t->stack_lo < (uintptr_t)(t->stack_hi - t->stack_lo)) return;  // the thread's locals
    if (a % size) fail(ERR_MISALIGNED_ADDRESS, std::string(write ? "write" : "read") + " of " + std::to_string(size) + " bytes at " +
                                                   hex(a) + " is not aligned to its size");
    BlockState& b = *t->block;
    long off = shared_offset(b, (uint8_t*)p, size);
    if (off >= 0) {
        shared_access((uint8_t*)p, size, write, t, write ? "a store" : "a load");
        return;
    }
    if (off == -2) fail(ERR_ILLEGAL_ADDRESS, std::string(write ? "write" : "read") + " of " + std::to_string(size) + " bytes at " + hex(a) + " runs past the end of shared memory");
    check_global(p, size, write, "global memory");
}

}  // namespace sim

// The instrumentation hooks. GCC and Clang call these with -fsanitize=thread.
extern "C" {
#define SIM_HOOKS(n)                                                                \
    void __tsan_read##n(void* p) { sim::access(p, n, false); }                      \
    void __tsan_write##n(void* p) { sim::access(p, n, true); }                      \
    void __tsan_unaligned_read##n(void* p) { sim::access(p, n, false); }            \
    void __tsan_unaligned_write##n(void* p) { sim::access(p, n, true); }            \
    void __tsan_volatile_read##n(void* p) { sim::access(p, n, false); }             \
    void __tsan_volatile_write##n(void* p) { sim::access(p, n, true); }
SIM_HOOKS(1)
SIM_HOOKS(2)
SIM_HOOKS(4)
SIM_HOOKS(8)
SIM_HOOKS(16)
#undef SIM_HOOKS
void __tsan_read_range(void* p, unsigned long size) {
    for (unsigned long i = 0; i < size; i++) sim::access((char*)p + i, 1, false);
}
void __tsan_write_range(void* p, unsigned long size) {
    for (unsigned long i = 0; i < size; i++) sim::access((char*)p + i, 1, true);
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}
}
