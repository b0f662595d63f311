// Device memory: host allocations with guard gaps between them, so that an access past the end
// of one buffer never lands inside the next. Every kernel access is looked up here; freed ranges
// are remembered for a better report.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <shared_mutex>

#include "runtime.h"

namespace sim {
namespace {
constexpr size_t GUARD = 4096;  // unmapped-for-kernels bytes on each side
constexpr size_t ALIGN = 256;   // cudaMalloc's alignment

struct Heap {
    std::shared_mutex mu;
    std::map<uintptr_t, Allocation> live;   // by base
    std::map<uintptr_t, Allocation> freed;  // recently freed, by base (for reports)
    std::map<uintptr_t, void*> raw;         // base -> malloc'd block
    size_t used = 0;
    uint64_t next_id = 1;
};
Heap& heap() {
    static Heap* h = new Heap;  // never destroyed: kernels may run during exit
    return *h;
}
}  // namespace

Result mem_alloc(size_t bytes, uintptr_t* out) {
    Heap& h = heap();
    std::unique_lock lock(h.mu);
    size_t size = bytes ? bytes : 1;
    if (h.used + size > device_memory()) return ERR_OUT_OF_MEMORY;
    void* raw = malloc(size + 2 * GUARD + ALIGN);
    if (!raw) return ERR_OUT_OF_MEMORY;
    uintptr_t base = ((uintptr_t)raw + GUARD + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1);
    Allocation a{base, size, h.next_id++};
    h.live[base] = a;
    h.raw[base] = raw;
    h.freed.erase(base);
    h.used += size;
    *out = base;
    return OK;
}

static std::atomic<uint64_t> g_generation{1};
uint64_t mem_generation() { return g_generation.load(std::memory_order_acquire); }

Result mem_free(uintptr_t ptr) {
    Heap& h = heap();
    std::unique_lock lock(h.mu);
    auto it = h.live.find(ptr);
    if (it == h.live.end()) return ERR_INVALID_VALUE;
    h.used -= it->second.size;
    h.freed[ptr] = it->second;
    if (h.freed.size() > 4096) h.freed.erase(h.freed.begin());
    h.live.erase(it);
    g_generation.fetch_add(1, std::memory_order_release);
    free(h.raw[ptr]);
    h.raw.erase(ptr);
    return OK;
}

void mem_set_graph_idle(uintptr_t base, bool idle) {
    Heap& h = heap();
    std::unique_lock lock(h.mu);
    auto it = h.live.find(base);
    if (it == h.live.end() || it->second.graph_idle == idle) return;
    it->second.graph_idle = idle;
    g_generation.fetch_add(1, std::memory_order_release);  // forget the lookups cached as valid
}

size_t mem_used() {
    Heap& h = heap();
    std::shared_lock lock(h.mu);
    return h.used;
}

static bool find_in(const std::map<uintptr_t, Allocation>& m, uintptr_t addr, Allocation* out) {
    auto it = m.upper_bound(addr);
    if (it == m.begin()) return false;
    --it;
    if (addr - it->second.base < it->second.size + GUARD) {
        *out = it->second;
        return true;
    }
    return false;
}

bool mem_find(uintptr_t addr, size_t size, Allocation* out, std::string* why) {
    Heap& h = heap();
    std::shared_lock lock(h.mu);
    Allocation a;
    if (find_in(h.live, addr, &a)) {
        if (a.graph_idle && addr - a.base < a.size) {
            if (why) {
                char buf[260];
                snprintf(buf, sizeof buf,
                         "inside the %zu-byte allocation at 0x%" PRIxPTR
                         ", graph memory (a captured cuMemAllocAsync) that no launch of its graph holds now",
                         a.size, a.base);
                *why = buf;
            }
            return false;
        }
        if (addr - a.base + size <= a.size) {
            *out = a;
            return true;
        }
        if (why) {
            char buf[200];
            snprintf(buf, sizeof buf, "%" PRIu64 " bytes past the end of the %zu-byte allocation at 0x%" PRIxPTR,
                     (uint64_t)(addr + size - (a.base + a.size)), a.size, a.base);
            *why = buf;
        }
        return false;
    }
    if (why) {
        auto it = h.live.upper_bound(addr);
        char buf[200];
        if (it != h.live.end() && it->first - addr <= GUARD) {
            snprintf(buf, sizeof buf, "%" PRIu64 " bytes before the %zu-byte allocation at 0x%" PRIxPTR,
                     (uint64_t)(it->first - addr), it->second.size, it->first);
            *why = buf;
        } else if (find_in(h.freed, addr, &a) && addr - a.base < a.size) {
            snprintf(buf, sizeof buf, "inside the %zu-byte allocation at 0x%" PRIxPTR ", which was freed", a.size, a.base);
            *why = buf;
        } else {
            *why = "not in any device allocation";
        }
    }
    return false;
}

Result mem_check_range(uintptr_t addr, size_t size, const char* what) {
    if (size == 0) return OK;
    Allocation a;
    std::string why;
    if (mem_find(addr, size, &a, &why)) return OK;
    char buf[160];
    snprintf(buf, sizeof buf, "%s of %zu bytes at 0x%" PRIxPTR ": ", what, size, addr);
    set_error_detail(ERR_INVALID_VALUE, buf + why);
    return ERR_INVALID_VALUE;
}

}  // namespace sim
