// Kernel execution: blocks run on a pool of OS threads (the caller included); inside a block
// every CUDA thread is a fiber, run round-robin in thread order until it reaches a barrier, a
// warp collective or its end. Barriers release when every thread of the block waits at the same
// one; a warp collective completes when every lane of its mask has arrived. The schedule is a
// pure function of the kernel and its inputs, and global atomics commit in block order, so a
// launch gives the same result on any number of workers.
#include <sys/mman.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>

#include "runtime.h"

struct sim_tls_index {
    unsigned long module, offset;
};
extern "C" void* __tls_get_addr(sim_tls_index*);  // glibc's dynamic TLS lookup

namespace sim {

// ---- error details (cuGetErrorString) ----
namespace {
std::mutex g_error_mu;
std::string g_error_detail[1000];
}  // namespace

void set_error_detail(Result code, const std::string& msg) {
    std::lock_guard lock(g_error_mu);
    if (code > 0 && code < 1000) g_error_detail[code] = msg;
}

const char* error_detail(Result code) {
    std::lock_guard lock(g_error_mu);
    if (code > 0 && code < 1000 && !g_error_detail[code].empty()) return g_error_detail[code].c_str();
    return nullptr;
}

// ---- launch state ----
struct LaunchState {
    LaunchConfig cfg;
    uint64_t total_blocks;
    std::atomic<uint64_t> next_block{0};
    std::atomic<bool> failed{false};
    Result code = OK;
    std::string message;
    std::mutex mu;
    std::condition_variable cv;
    std::vector<uint8_t> done;
    uint64_t done_prefix = 0;  // blocks [0, done_prefix) have all finished

    void record(Result c, const std::string& msg) {
        std::lock_guard lock(mu);
        if (!failed.load()) {
            code = c;
            message = msg;
            failed.store(true);
        }
        cv.notify_all();
    }
    void block_done(uint64_t b) {
        std::lock_guard lock(mu);
        done[b] = 1;
        while (done_prefix < total_blocks && done[done_prefix]) done_prefix++;
        cv.notify_all();
    }
};

namespace {
constexpr size_t STACK_BYTES = 128 * 1024;
constexpr size_t MAX_THREADS = 1024;
constexpr size_t DYN_GUARD = 4096;

thread_local Worker tl_worker;
thread_local std::vector<Thread> tl_threads;
thread_local uint8_t* tl_stacks = nullptr;
thread_local std::vector<uint8_t> tl_dyn_smem;

uint8_t* stacks() {
    if (!tl_stacks) {
        void* p = mmap(nullptr, STACK_BYTES * MAX_THREADS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            fprintf(stderr, "cuda-sim: cannot reserve fiber stacks\n");
            abort();
        }
        tl_stacks = (uint8_t*)p;
    }
    return tl_stacks;
}

std::string dim3_str(sim_dim3 d) {
    char b[64];
    snprintf(b, sizeof b, "(%u,%u,%u)", d.x, d.y, d.z);
    return b;
}

}  // namespace

Worker* worker() { return &tl_worker; }

Thread* current_thread(const char* instruction) {
    Thread* t = tl_worker.current;
    if (!t) {
        fprintf(stderr, "cuda-sim: %s called outside a kernel\n", instruction);
        abort();
    }
    return t;
}

std::string where() {
    Worker* w = worker();
    if (!w->block) return "outside any kernel";
    std::string s = "kernel " + w->block->launch->cfg.fn->name + " block " + dim3_str(w->block->bid);
    if (w->current) s += " thread " + dim3_str(w->current->tid);
    return s;
}

namespace {
[[noreturn]] void abandon_fiber() {
    Worker* w = worker();
    Thread* t = w->current;
    fiber_switch(t->fiber, w->scheduler);
    abort();  // an abandoned fiber is never resumed
}

// Hand the worker to the next runnable thread of the block in thread order (directly, fiber to
// fiber), or back to the scheduler at the end of the sweep.
void yield() {
    Worker* w = worker();
    Thread* cur = w->current;
    std::vector<Thread>& th = *cur->block->threads;
    for (size_t i = cur->linear + 1; i < th.size(); i++) {
        if (th[i].state == ThreadState::Runnable) {
            w->current = &th[i];
            fiber_switch(cur->fiber, th[i].fiber);
            return;  // whoever resumes this fiber has set w->current back to it
        }
    }
    fiber_switch(cur->fiber, w->scheduler);
}
}  // namespace

void fail(Result code, const std::string& what) {
    Worker* w = worker();
    std::string msg = "cuda-sim: " + where() + ": " + what;
    if (w->block) w->block->launch->record(code, msg);
    if (w->current) abandon_fiber();
    // Not on a fiber: a defect found by the scheduler itself, which returns on its own.
    abort();
}

void cp_async_complete_all(Thread& t);  // ptx.cpp

namespace {
void fiber_main(void* arg) {
    Thread* t = (Thread*)arg;
    LaunchState* L = t->block->launch;
    L->cfg.fn->host->thunk(L->cfg.params);
    cp_async_complete_all(*t);  // copies still in flight land when the thread ends
    if (!t->wgmma_open.empty() || !t->wgmma_groups.empty())
        fail(ERR_LAUNCH_FAILED, "the thread ends with wgmma operations not retired (wgmma.commit_group and "
                                "wgmma.wait_group 0 before the accumulators are used or the kernel returns)");
    t->state = ThreadState::Exited;
    t->block->warps[t->warp].exited |= 1u << t->lane;
    yield();
    abort();
}

const char* collective_name(Collective k) {
    switch (k) {
        case Collective::Shfl: return "a shuffle";
        case Collective::Vote: return "a vote";
        case Collective::SyncWarp: return "__syncwarp";
        case Collective::LdMatrix: return "ldmatrix";
        case Collective::Mma: return "mma.sync";
        case Collective::Wgmma: return "wgmma with A in registers";
        default: return "nothing";
    }
}

// Every thread is blocked: release the barrier, or report why it cannot be released.
bool release_or_report(BlockState& b, std::vector<Thread>& th) {
    LaunchState* L = b.launch;
    auto report = [&](const std::string& what) {
        L->record(ERR_LAUNCH_FAILED, "cuda-sim: kernel " + L->cfg.fn->name + " block " + dim3_str(b.bid) + ": " + what);
        return false;
    };
    std::string waits = mbarrier_waits(b);
    if (waits.empty()) waits = wgmma_waits(b);
    if (!waits.empty()) return report(waits);
    for (size_t wi = 0; wi < b.warps.size(); wi++) {
        Warp& wp = b.warps[wi];
        if (!wp.arrived) continue;
        for (unsigned lane = 0; lane < 32; lane++) {
            if (!((wp.mask >> lane) & 1) || ((wp.arrived >> lane) & 1)) continue;
            Thread& o = th[wi * 32 + lane];
            std::string state = o.state == ThreadState::Exited ? "has exited"
                                : o.state == ThreadState::Barrier ? "waits at the barrier at line " + std::to_string(o.barrier_line)
                                                                  : "waits elsewhere";
            return report("warp " + std::to_string(wi) + " waits in " + collective_name(wp.kind) + " at line " +
                          std::to_string(wp.line) + " for lane " + std::to_string(lane) + " (thread " + dim3_str(o.tid) +
                          "), which " + state + " (deadlock: every lane of the mask must reach the operation)");
        }
    }
    const Thread* first = nullptr;
    const Thread* exited = nullptr;
    for (Thread& t : th) {
        if (t.state == ThreadState::Exited) {
            if (!exited) exited = &t;
            continue;
        }
        if (!first) {
            first = &t;
        } else if (t.barrier_line != first->barrier_line) {
            return report("divergent barrier: thread " + dim3_str(first->tid) + " waits at the __syncthreads at line " +
                          std::to_string(first->barrier_line) + ", thread " + dim3_str(t.tid) + " at line " +
                          std::to_string(t.barrier_line));
        }
    }
    if (exited) {
        return report("the __syncthreads at line " + std::to_string(first->barrier_line) +
                      " is not reached by every thread of the block: thread " + dim3_str(exited->tid) +
                      " has exited (a barrier must be reached by all threads or none)");
    }
    b.epoch = ++worker()->epoch_counter;
    for (Thread& t : th) t.state = ThreadState::Runnable;
    return true;
}

// This worker's TLS block of the kernel's module: where its static __shared__ arrays live.
void* tls_block(const HostKernel* k) {
    sim_tls_index ti{k->tls_modid, 0};
    return k->tls_modid ? __tls_get_addr(&ti) : nullptr;
}

void run_block(LaunchState& L, uint64_t linear) {
    Worker* w = worker();
    const LaunchConfig& c = L.cfg;
    BlockState b{};
    b.launch = &L;
    b.fn = c.fn;
    b.linear = linear;
    b.bid = {(unsigned)(linear % c.grid.x), (unsigned)((linear / c.grid.x) % c.grid.y),
             (unsigned)(linear / ((uint64_t)c.grid.x * c.grid.y))};
    b.nthreads = c.block.x * c.block.y * c.block.z;
    b.warps.assign((b.nthreads + 31) / 32, Warp{});
    b.static_base = (uint8_t*)tls_block(c.fn->host);
    b.static_size = b.static_base ? c.fn->host->tls_size : 0;
    // 256 KB-aligned, like a shared window that starts at 0: wgmma descriptors carry the low 18
    // bits of a shared address, and swizzles act on address bits 4-9.
    constexpr uintptr_t WINDOW = 1u << 18;
    if (tl_dyn_smem.size() < c.smem_bytes + DYN_GUARD + WINDOW) tl_dyn_smem.resize(c.smem_bytes + DYN_GUARD + WINDOW);
    b.dyn_base = (uint8_t*)(((uintptr_t)tl_dyn_smem.data() + WINDOW - 1) & ~(WINDOW - 1));
    b.dyn_size = c.smem_bytes;
    // Shared memory starts as NaN bytes: a read of a value never written shows up in the output.
    if (b.static_size) memset(b.static_base, 0xff, b.static_size);
    memset(b.dyn_base, 0xff, b.dyn_size);
    b.epoch = ++w->epoch_counter;
    shadow_begin_block(b);

    std::vector<Thread>& th = tl_threads;
    th.resize(b.nthreads);
    b.threads = &th;
    uint8_t* stack_area = stacks();
    for (unsigned i = 0; i < b.nthreads; i++) {
        Thread& t = th[i];
        t.block = &b;
        t.tid = {i % c.block.x, (i / c.block.x) % c.block.y, i / (c.block.x * c.block.y)};
        t.linear = i;
        t.warp = i / 32;
        t.lane = i % 32;
        t.state = ThreadState::Runnable;
        t.barrier_line = 0;
        t.open_group.clear();
        t.groups.clear();
        t.wait_bar = nullptr;
        t.wgmma_issued = 0;
        t.wgmma_open.clear();
        t.wgmma_groups.clear();
        t.stack_lo = stack_area + i * STACK_BYTES;
        t.stack_hi = t.stack_lo + STACK_BYTES;
        fiber_init(t.fiber, t.stack_lo, STACK_BYTES, fiber_main, &t);
    }
    w->block = &b;
    for (;;) {
        // One sweep: the first runnable thread runs, and each thread that blocks hands over to
        // the next runnable one; the sweep ends back here.
        Thread* first = nullptr;
        for (Thread& t : th)
            if (t.state == ThreadState::Runnable) {
                first = &t;
                break;
            }
        if (first) {
            w->current = first;
            fiber_switch(w->scheduler, first->fiber);
            w->current = nullptr;
            if (L.failed.load(std::memory_order_relaxed)) break;
            continue;
        }
        bool all_exited = true;
        for (Thread& t : th) all_exited &= t.state == ThreadState::Exited;
        if (all_exited) {
            std::string left = block_end_async_leftovers(b);
            if (!left.empty())
                L.record(ERR_LAUNCH_FAILED, "cuda-sim: kernel " + L.cfg.fn->name + " block " + dim3_str(b.bid) + ": " + left);
            break;
        }
        std::string error;
        if (wake_mbarrier_waiters(b, &error)) continue;
        if (!error.empty()) {
            L.record(ERR_LAUNCH_FAILED, "cuda-sim: kernel " + L.cfg.fn->name + " block " + dim3_str(b.bid) + ": " + error);
            break;
        }
        if (!release_or_report(b, th)) break;
    }
    w->block = nullptr;
}

// ---- worker pool ----
class Pool {
  public:
    static Pool& get() {
        static Pool* p = new Pool;  // never joined: workers idle until the process exits
        return *p;
    }
    unsigned size() const { return (unsigned)threads_.size() + 1; }
    // Runs job(worker_index) on up to n workers (the caller is worker 0) and waits for all.
    void run(unsigned n, const std::function<void(unsigned)>& job) {
        n = std::max(1u, std::min(n, size()));
        if (n == 1) {
            job(0);
            return;
        }
        {
            std::lock_guard lock(mu_);
            job_ = &job;
            want_ = n - 1;
            taken_ = 0;
            finished_ = 0;
            gen_++;
        }
        cv_.notify_all();
        job(0);
        std::unique_lock lock(mu_);
        done_cv_.wait(lock, [&] { return finished_ == want_; });
        job_ = nullptr;
    }

  private:
    Pool() {
        unsigned n = std::thread::hardware_concurrency();
        if (const char* s = getenv("FLUX2_SIM_THREADS")) n = (unsigned)atoi(s);
        if (n < 1) n = 1;
        for (unsigned i = 1; i < n; i++) threads_.emplace_back([this] { loop(); });
        for (auto& t : threads_) t.detach();
    }
    void loop() {
        uint64_t seen = 0;
        for (;;) {
            std::unique_lock lock(mu_);
            cv_.wait(lock, [&] { return gen_ != seen && job_ && taken_ < want_; });
            seen = gen_;
            unsigned index = ++taken_;
            const std::function<void(unsigned)>* job = job_;
            lock.unlock();
            (*job)(index);
            lock.lock();
            if (++finished_ == want_) done_cv_.notify_all();
        }
    }
    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    const std::function<void(unsigned)>* job_ = nullptr;
    unsigned want_ = 0, taken_ = 0, finished_ = 0;
    uint64_t gen_ = 0;
};
}  // namespace

Result launch(const LaunchConfig& cfg) {
    LaunchState L;
    L.cfg = cfg;
    L.total_blocks = (uint64_t)cfg.grid.x * cfg.grid.y * cfg.grid.z;
    L.done.assign(L.total_blocks, 0);
    Pool& pool = Pool::get();
    unsigned workers = (unsigned)std::min<uint64_t>(pool.size(), L.total_blocks);
    pool.run(workers, [&](unsigned) {
        for (;;) {
            uint64_t b = L.next_block.fetch_add(1);
            if (b >= L.total_blocks || L.failed.load()) break;
            run_block(L, b);
            if (L.failed.load()) break;
            L.block_done(b);
        }
    });
    if (L.failed.load()) {
        fprintf(stderr, "%s\n", L.message.c_str());
        set_error_detail(L.code, L.message);
        return L.code;
    }
    return OK;
}

// Global atomics of block b run once blocks 0..b-1 have finished: a fixed order, so float
// atomics give the same sums on every run.
void wait_atomic_turn() {
    Worker* w = worker();
    BlockState& b = *w->block;
    if (b.atomic_turn) return;
    LaunchState& L = *b.launch;
    {
        std::unique_lock lock(L.mu);
        L.cv.wait(lock, [&] { return L.done_prefix >= b.linear || L.failed.load(); });
    }
    if (L.failed.load()) abandon_fiber();
    b.atomic_turn = true;
}

void warp_collective(Collective kind, unsigned mask, int line,
                     void (*complete)(BlockState&, Warp&, unsigned, unsigned)) {
    Worker* w = worker();
    Thread* t = w->current;
    if (!t) sim_trap("warp collective outside a kernel");
    BlockState& b = *t->block;
    Warp& wp = b.warps[t->warp];
    std::vector<Thread>& th = *b.threads;
    unsigned lanes = std::min(32u, b.nthreads - t->warp * 32);
    unsigned valid = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    if (!((mask >> t->lane) & 1))
        fail(ERR_LAUNCH_FAILED, std::string(collective_name(kind)) + " at line " + std::to_string(line) +
                                    ": the calling lane is not in its mask");
    if (mask & ~valid) {
        char buf[160];
        snprintf(buf, sizeof buf, "%s at line %d: mask 0x%08x names lanes past the block's last thread", collective_name(kind), line, mask);
        fail(ERR_LAUNCH_FAILED, buf);
    }
    if (wp.arrived == 0) {
        wp.kind = kind;
        wp.mask = mask;
        wp.line = line;
    } else if (wp.kind != kind || wp.mask != mask) {
        char buf[240];
        snprintf(buf, sizeof buf, "lanes of warp %u reached different warp-collective operations: %s (mask 0x%08x) at line %d and %s (mask 0x%08x) at line %d",
                 t->warp, collective_name(wp.kind), wp.mask, wp.line, collective_name(kind), mask, line);
        fail(ERR_LAUNCH_FAILED, buf);
    }
    wp.arrived |= 1u << t->lane;
    if (wp.arrived != mask) {
        if (unsigned gone = mask & wp.exited)
            fail(ERR_LAUNCH_FAILED, std::string(collective_name(kind)) + " at line " + std::to_string(line) + ": lane " +
                                        std::to_string(__builtin_ctz(gone)) + " of the mask has exited");
        t->state = ThreadState::Warp;
        yield();
        return;
    }
    unsigned first = __builtin_ctz(mask);
    complete(b, wp, mask, first);
    wp.arrived = 0;
    wp.sync_epoch++;
    Thread* lanes0 = &th[t->warp * 32];
    for (unsigned m = mask; m; m &= m - 1) lanes0[__builtin_ctz(m)].state = ThreadState::Runnable;
}

}  // namespace sim

using namespace sim;

extern "C" {
sim_dim3 sim_thread_idx() { return worker()->current->tid; }
sim_dim3 sim_block_idx() { return worker()->block->bid; }
sim_dim3 sim_block_dim() { return worker()->block->launch->cfg.block; }
sim_dim3 sim_grid_dim() { return worker()->block->launch->cfg.grid; }

void sim_syncthreads(int line) {
    Thread* t = worker()->current;
    if (!t) sim_trap("__syncthreads outside a kernel");
    t->state = ThreadState::Barrier;
    t->barrier_line = line;
    yield();
}

void* sim_dynamic_smem() { return worker()->block->dyn_base; }
}

namespace sim {
void block_on_wgmma(uint64_t op) {
    Thread* t = worker()->current;
    t->state = ThreadState::WgmmaWait;
    t->wait_op = op;
    yield();  // issue_wgmma makes it runnable once the 128th thread has issued the op
}

void run_first(Thread* next) {
    Worker* w = worker();
    Thread* cur = w->current;
    cur->state = ThreadState::Runnable;
    w->current = next;
    fiber_switch(cur->fiber, next->fiber);  // when `next` blocks, the sweep goes on from it in thread order
}

void block_on_mbarrier(const void* bar, unsigned parity) {
    Thread* t = worker()->current;
    t->state = ThreadState::MbarrierWait;
    t->wait_bar = bar;
    t->wait_parity = parity;
    yield();  // the scheduler makes it runnable once the phase has completed
}
}  // namespace sim

extern "C" {

unsigned sim_activemask() {
    // Fibers of a warp are never split by divergence here: the active lanes are those that have
    // not exited.
    Thread* t = worker()->current;
    BlockState& b = *t->block;
    unsigned m = 0;
    for (unsigned lane = 0; lane < 32; lane++) {
        unsigned i = t->warp * 32 + lane;
        if (i < b.nthreads && (*b.threads)[i].state != ThreadState::Exited) m |= 1u << lane;
    }
    return m;
}

void sim_trap(const char* what) {
    if (worker()->current) fail(ERR_LAUNCH_FAILED, what);
    fprintf(stderr, "cuda-sim: %s\n", what);
    abort();
}
}
