// Hopper's asynchronous instructions (sm_90a), from the PTX ISA: mbarrier (arrive, expect_tx,
// phase waits), TMA tile loads (cp.async.bulk.tensor with mbarrier::complete_tx) and warpgroup
// MMA (wgmma.mma_async with shared-memory descriptors, commit and wait groups).
//
// Timing model: everything asynchronous completes as late as the kernel allows, so a kernel that
// reads too early sees it. A TMA copy lands only when a thread waits on its mbarrier and the
// barrier has all its arrivals; until then its bytes are in flight and any read of them (a load,
// a wgmma) is a reported fault. A wgmma reads shared memory when the first thread of its
// warpgroup retires it (wgmma.wait_group), and writes each thread's accumulators when that thread
// retires it, so accumulators read before the wait are stale and a stage refilled before the
// wait is caught in flight.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../include/sim_tensor_map.h"
#include "runtime.h"

namespace sim {
namespace {

// Hopper instructions need an sm_90a image (wgmma) or sm_90+ (mbarrier tx counts, TMA).
void require_hopper(bool arch_specific, const char* instruction) {
    const Function& f = *worker()->block->fn;
    bool ok = f.image_arch >= 90 && (!arch_specific || (f.image_arch == 90 && f.image_arch_specific));
    if (!ok)
        fail(ERR_ILLEGAL_INSTRUCTION, std::string(instruction) + (arch_specific ? " needs an sm_90a image" : " needs sm_90 or newer") +
                                          "; this kernel's image is for sm_" + std::to_string(f.image_arch) +
                                          (f.image_arch_specific ? "a" : ""));
}

std::string shared_name(const BlockState& b, const void* p) {
    uintptr_t a = (uintptr_t)p;
    if (a - (uintptr_t)b.dyn_base < b.dyn_size) return "dynamic shared offset " + std::to_string(a - (uintptr_t)b.dyn_base);
    if (a - (uintptr_t)b.static_base < b.static_size) return "static shared offset " + std::to_string(a - (uintptr_t)b.static_base);
    return hex(a);
}

Mbarrier& barrier_at(BlockState& b, const void* bar, const char* what) {
    auto it = b.mbarriers.find((uintptr_t)bar);
    if (it == b.mbarriers.end())
        fail(ERR_LAUNCH_FAILED, std::string(what) + " on " + shared_name(b, bar) + ", which no mbarrier.init initialised");
    return it->second;
}

// Lands the copies of a barrier whose arrivals are all in (their bytes counted off its
// transaction count), then completes the phase when nothing is outstanding. Returns an error
// description instead of failing: the scheduler calls it outside any thread.
std::string settle(BlockState& b, const void* bar, Mbarrier& m) {
    if (m.pending != 0) return "";
    for (TmaCopy& c : m.copies) {
        cp_async_mark_inflight(c.dst, c.bytes.size(), -1);
        memcpy(c.dst, c.bytes.data(), c.bytes.size());
        shared_async_written(c.dst, c.bytes.size());
        m.tx -= (int64_t)c.bytes.size();
    }
    m.copies.clear();
    if (m.tx < 0)
        return "the TMA copies on the mbarrier at " + shared_name(b, bar) + " brought " + std::to_string(-m.tx) +
               " bytes more than its expect_tx announced (the phase would complete before they land)";
    if (m.tx == 0) {
        m.phase++;
        m.pending = m.count;
    }
    return "";
}

bool phase_done(const Mbarrier& m, unsigned parity) { return (m.phase & 1u) != (parity & 1u); }

// ---- wgmma operands: shared-memory matrix descriptors ----
// bits 0-13 start address >> 4, 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension
// byte offset >> 4, 49-51 base offset, 62-63 swizzle (0 none, 1 128B, 2 64B, 3 32B). The address
// is the shared window's: here the dynamic shared memory of the block, which the runtime places
// at a 256 KB-aligned host address so the window's low 18 bits are the host's.
struct Descriptor {
    uintptr_t start;
    uint32_t lbo, sbo, base_offset, swizzle;
};

Descriptor decode(const BlockState& b, uint64_t d) {
    Descriptor r;
    r.start = (uintptr_t)b.dyn_base + (uintptr_t)((d & 0x3fff) << 4);
    r.lbo = (uint32_t)(((d >> 16) & 0x3fff) << 4);
    r.sbo = (uint32_t)(((d >> 32) & 0x3fff) << 4);
    r.base_offset = (uint32_t)((d >> 49) & 7);
    r.swizzle = (uint32_t)(d >> 62);
    return r;
}

// Address of byte `kb` (0..31) of row `row` of a K-major operand (A: M rows, B: N rows, K
// contiguous): with a swizzle of S bytes, rows of 8 are S-byte lines `sbo` apart in groups of
// 8 rows, and the 16-byte chunks of a line are XORed with address bits 7.. (Swizzle<log2(S/16),4,3>);
// without, 8x16-byte core matrices, `sbo` apart along rows and `lbo` apart along K.
uintptr_t operand_byte(const Descriptor& d, int row, int kb) {
    if (d.swizzle == 0) return d.start + (uintptr_t)(row / 8) * d.sbo + (uintptr_t)(kb / 16) * d.lbo + (row % 8) * 16 + kb % 16;
    const uint32_t line = d.swizzle == 1 ? 128 : d.swizzle == 2 ? 64 : 32;
    const uintptr_t mask = line / 16 - 1;
    uintptr_t a = d.start + (uintptr_t)(row / 8) * d.sbo + (uintptr_t)(row % 8) * line + kb;
    return a ^ (((a >> 7) & mask) << 4);
}

// The 16-byte chunk `chunk` (0, 1) of K of row `row` of an operand, checked: inside the block's
// dynamic shared memory, not being written by a copy. Swizzles move whole 16-byte chunks.
const uint8_t* operand_chunk(BlockState& b, const Descriptor& d, int row, int chunk, const char* which) {
    uint8_t* p = (uint8_t*)operand_byte(d, row, chunk * 16);
    if ((uintptr_t)p - (uintptr_t)b.dyn_base + 16 > b.dyn_size)
        fail(ERR_ILLEGAL_ADDRESS, std::string("wgmma ") + which + " operand row " + std::to_string(row) +
                                      " lies outside the block's dynamic shared memory (descriptor start offset " +
                                      std::to_string(d.start - (uintptr_t)b.dyn_base) + ")");
    if (shared_inflight(p, 16))
        fail(ERR_LAUNCH_FAILED, std::string("wgmma reads its ") + which + " operand at " + shared_name(b, p) +
                                    ", which a TMA copy is still writing (wait on the stage's mbarrier before the "
                                    "wgmma, and retire the wgmma before the stage is refilled)");
    return p;
}

Descriptor checked_descriptor(const BlockState& b, uint64_t desc, const char* which) {
    Descriptor d = decode(b, desc);
    if (d.base_offset != 0) fail(ERR_LAUNCH_FAILED, std::string("wgmma ") + which + " descriptor: a base offset is not emulated");
    return d;
}

// Checks `rows` rows of 32 bytes of K of one operand without reading them (at issue).
void check_operand(BlockState& b, uint64_t desc, int rows, const char* which) {
    Descriptor d = checked_descriptor(b, desc, which);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 2; c++) operand_chunk(b, d, r, c, which);
}

// Reads `rows` rows of 32 bytes of K of one operand as doubles, row-major [rows][k].
void read_operand(BlockState& b, uint64_t desc, int rows, int type, const char* which, std::vector<double>& out) {
    Descriptor d = checked_descriptor(b, desc, which);
    const int k = type == SIM_WGMMA_BF16 ? 16 : 32, per_chunk = k / 2;
    out.resize((size_t)rows * k);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 2; c++) {
            const uint8_t* p = operand_chunk(b, d, r, c, which);
            double* o = &out[(size_t)r * k + c * per_chunk];
            if (type == SIM_WGMMA_BF16) {
                for (int e = 0; e < 8; e++) {
                    uint32_t u = (uint32_t)(p[2 * e] | (p[2 * e + 1] << 8)) << 16;
                    float f;
                    memcpy(&f, &u, 4);
                    o[e] = f;
                }
            } else if (type == SIM_WGMMA_S8) {
                for (int e = 0; e < 16; e++) o[e] = (int8_t)p[e];
            } else {
                for (int e = 0; e < 16; e++) o[e] = e4m3_value(p[e]);
            }
        }
}

// A's rows of warp w (16 x k, row-major) from its 32 lanes' register fragments: per warp the
// layouts of mma.sync m16n8k16 (bf16) and m16n8k32 (e4m3).
void a_rows_from_fragments(const WgmmaOp& op, unsigned w, std::vector<double>& out) {
    const int k = op.type == SIM_WGMMA_BF16 ? 16 : 32;
    double A[16][32];
    for (unsigned l = 0; l < 32; l++)
        mma_a_fragment(&op.a_frag[(w * 32 + l) * 4], l, op.type == SIM_WGMMA_BF16 ? nullptr : e4m3_value, A);
    out.resize(16 * k);
    for (int r = 0; r < 16; r++) std::copy(A[r], A[r] + k, &out[(size_t)r * k]);
}

// The product rows of warp w (all 64 rows when A is in shared memory, read now with B); B is read
// once, at the warpgroup's first retirement of the op.
void compute_rows(BlockState& b, WgmmaOp& op, unsigned w) {
    thread_local std::vector<double> A;
    const int k = op.type == SIM_WGMMA_BF16 ? 16 : 32;
    if (!op.b_read) {
        read_operand(b, op.desc_b, op.n, op.type, "B", op.b);
        op.product.assign((size_t)64 * op.n, 0.0);
        op.b_read = true;
    }
    int r0 = 0, rows = 64;
    if (op.a_in_regs) {
        a_rows_from_fragments(op, w, A);
        r0 = 16 * (int)w, rows = 16;
    } else {
        read_operand(b, op.desc_a, 64, op.type, "A", A);
    }
    for (int i = 0; i < rows; i++) {
        const double* a = &A[(size_t)i * k];
        for (int j = 0; j < op.n; j++) {
            const double* bb = &op.b[(size_t)j * k];
            double acc = 0;
            for (int e = 0; e < k; e++) acc += a[e] * bb[e];
            op.product[(size_t)(r0 + i) * op.n + j] = acc;
        }
    }
    op.warps_done |= op.a_in_regs ? 1u << w : 0xfu;
}

// Warpgroup-wide instructions (wgmma, setmaxnreg) need all 128 threads of the caller's warpgroup.
void require_whole_warpgroup(const Thread& t, const std::string& what) {
    if (t.block->nthreads < (t.warp / 4 + 1) * 128)
        fail(ERR_LAUNCH_FAILED, what + " needs its whole warpgroup of 128 threads; the block's last warpgroup is partial");
}

WarpGroup& warpgroup_of(Thread& t) {
    BlockState& b = *t.block;
    unsigned g = t.warp / 4;
    if (b.warpgroups.size() <= g) b.warpgroups.resize(g + 1);
    return b.warpgroups[g];
}

// The thread's share of a retired op: accumulator element 4i + j of thread (warp w, lane l) of
// the warpgroup is D[16w + l/4 + 8(j >= 2)][8i + 2(l%4) + (j & 1)].
void retire(Thread& t, const WgmmaPart& part) {
    BlockState& b = *t.block;
    WarpGroup& g = warpgroup_of(t);
    WgmmaOp& op = g.ops[part.op - g.base];
    const unsigned w = t.warp % 4, l = t.lane;
    if (!((op.warps_done >> w) & 1)) compute_rows(b, op, w);
    for (int i = 0; i < op.n / 8; i++)
        for (int j = 0; j < 4; j++) {
            unsigned row = 16 * w + l / 4 + (j >= 2 ? 8 : 0), col = 8 * i + 2 * (l % 4) + (j & 1);
            const double p = op.product[(size_t)row * op.n + col];
            if (op.type == SIM_WGMMA_S8) {  // exact: |sum| <= 127^2 * 32 per op, s32 wraps as the hardware's
                int32_t* d = (int32_t*)part.d + 4 * i + j;
                *d = (int32_t)((uint32_t)(part.scale_d ? *d : 0) + (uint32_t)(int32_t)p);
            } else {
                float* d = (float*)part.d + 4 * i + j;
                *d = (float)(p + (part.scale_d ? (double)*d : 0.0));
            }
        }
    op.retired++;
    while (!g.ops.empty() && g.ops.front().retired == 128) {
        g.ops.pop_front();
        g.base++;
    }
}

}  // namespace

double e4m3_value(uint8_t code) {
    // By table, decoded once: a wgmma reads tens of thousands of codes.
    static const struct Table {
        double v[256];
        Table() {
            for (int c = 0; c < 256; c++) {
                int exp = (c >> 3) & 15, m = c & 7;
                double s = (c & 0x80) ? -1 : 1;
                v[c] = exp == 15 && m == 7 ? NAN : exp == 0 ? s * std::ldexp((double)m, -9) : s * std::ldexp(1 + m / 8.0, exp - 7);
            }
        }
    } table;
    return table.v[code];
}

bool wake_mbarrier_waiters(BlockState& b, std::string* error) {
    bool woke = false;
    for (Thread& t : *b.threads) {
        if (t.state != ThreadState::MbarrierWait) continue;
        auto it = b.mbarriers.find((uintptr_t)t.wait_bar);
        std::string err = settle(b, t.wait_bar, it->second);
        if (!err.empty()) {
            *error = err;
            return false;
        }
        if (phase_done(it->second, t.wait_parity)) {
            t.state = ThreadState::Runnable;
            woke = true;
        }
    }
    return woke;
}

std::string mbarrier_waits(const BlockState& b) {
    for (const Thread& t : *b.threads) {
        if (t.state != ThreadState::MbarrierWait) continue;
        const Mbarrier& m = b.mbarriers.at((uintptr_t)t.wait_bar);
        char buf[96];
        snprintf(buf, sizeof buf, "(%u,%u,%u)", t.tid.x, t.tid.y, t.tid.z);
        return std::string("thread ") + buf + " waits on the mbarrier at " + shared_name(b, t.wait_bar) + " for the phase of parity " +
               std::to_string(t.wait_parity) + ", which cannot complete: " + std::to_string(m.pending) + " of " +
               std::to_string(m.count) + " arrivals missing, " + std::to_string(m.tx) +
               " transaction bytes expected and not brought by any copy (deadlock)";
    }
    return "";
}

std::string wgmma_waits(const BlockState& b) {
    for (const Thread& t : *b.threads) {
        if (t.state != ThreadState::WgmmaWait) continue;
        const WarpGroup& g = b.warpgroups[t.warp / 4];
        char buf[96];
        snprintf(buf, sizeof buf, "(%u,%u,%u)", t.tid.x, t.tid.y, t.tid.z);
        return std::string("thread ") + buf + " waits in wgmma.wait_group for a wgmma that " +
               std::to_string(g.ops[t.wait_op - g.base].issued) + " of its warpgroup's 128 threads have issued, which the others " +
               "never reach (deadlock: every thread of a warpgroup issues each wgmma)";
    }
    return "";
}

std::string block_end_async_leftovers(const BlockState& b) {
    for (const auto& [addr, m] : b.mbarriers)
        if (!m.copies.empty())
            return std::to_string(m.copies.size()) + " TMA copies on the mbarrier at " + shared_name(b, (const void*)addr) +
                   " were never waited for (the block ended with them in flight)";
    return "";
}

}  // namespace sim

using namespace sim;

extern "C" {
void sim_mbarrier_init(void* bar, unsigned count) {
    Thread* t = current_thread("mbarrier.init");
    require_hopper(false, "mbarrier with transaction counts");
    check_alignment(bar, 8, "mbarrier");
    if (!in_shared((uint8_t*)bar, 8)) fail(ERR_ILLEGAL_ADDRESS, "mbarrier.init: the barrier is not in shared memory");
    if (count < 1 || count > (1u << 20) - 1) fail(ERR_LAUNCH_FAILED, "mbarrier.init: count " + std::to_string(count) + " outside 1..2^20-1");
    shared_access((uint8_t*)bar, 8, true, t, "mbarrier.init");
    Mbarrier& m = t->block->mbarriers[(uintptr_t)bar];
    if (!m.copies.empty()) fail(ERR_LAUNCH_FAILED, "mbarrier.init of a barrier with TMA copies in flight");
    m = Mbarrier{};
    m.count = m.pending = count;
}

void sim_setmaxnreg(unsigned count, int inc) {
    Thread* t = current_thread("setmaxnreg");
    require_hopper(true, "setmaxnreg");
    const char* op = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
    if (count < 24 || count > 256 || count % 8)
        fail(ERR_LAUNCH_FAILED, std::string(op) + " " + std::to_string(count) + ": the count must be a multiple of 8 in 24..256");
    BlockState& b = *t->block;
    require_whole_warpgroup(*t, op);
    WarpGroup& g = warpgroup_of(*t);
    if (g.asked == 0) g.asking = count;
    if (g.asking != count)
        fail(ERR_LAUNCH_FAILED, std::string("the threads of a warpgroup asked setmaxnreg for different counts (") +
                                    std::to_string(g.asking) + " and " + std::to_string(count) + "; it is .sync.aligned)");
    if (++g.asked < 128) return;
    g.asked = 0;
    if (g.regs && (inc ? count < g.regs : count > g.regs))
        fail(ERR_LAUNCH_FAILED, std::string(op) + " " + std::to_string(count) + " from " + std::to_string(g.regs) +
                                    " registers per thread goes the wrong way");
    g.regs = count;
    // The warpgroups that have set their count hold them out of the SM's 64K registers (one block per SM:
    // the kernels that use it are launched so); more would leave setmaxnreg.inc waiting forever.
    unsigned total = 0;
    for (const WarpGroup& w : b.warpgroups) total += w.regs * 128;
    if (total > 65536)
        fail(ERR_LAUNCH_FAILED, "setmaxnreg: the block's warpgroups ask for " + std::to_string(total) +
                                    " registers, more than the SM's 65536 (the increase would never be granted)");
}

void sim_mbarrier_arrive(void* bar, unsigned tx_bytes) {
    Thread* t = current_thread("mbarrier.arrive");
    BlockState& b = *t->block;
    Mbarrier& m = barrier_at(b, bar, tx_bytes ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive");
    if (m.pending == 0)
        fail(ERR_LAUNCH_FAILED, "mbarrier.arrive on " + shared_name(b, bar) + ": all " + std::to_string(m.count) +
                                    " arrivals of the current phase are in already (more arrivals than its count)");
    m.tx += tx_bytes;
    m.pending--;
    if (m.pending == 0 && m.copies.empty() && m.tx == 0) {
        m.phase++;
        m.pending = m.count;
        // The threads waiting for this phase run at once (the most revealing order: a stage handed
        // back before all its readers have retired is refilled while they still read it).
        Thread* first = nullptr;
        for (Thread& w : *b.threads)
            if (w.state == ThreadState::MbarrierWait && w.wait_bar == bar && phase_done(m, w.wait_parity)) {
                w.state = ThreadState::Runnable;
                if (!first) first = &w;
            }
        if (first) run_first(first);
    }
}

void sim_mbarrier_wait(void* bar, unsigned parity) {
    Thread* t = current_thread("mbarrier.try_wait");
    BlockState& b = *t->block;
    Mbarrier& m = barrier_at(b, bar, "mbarrier.try_wait");
    std::string err = settle(b, bar, m);
    if (!err.empty()) fail(ERR_LAUNCH_FAILED, err);
    if (phase_done(m, parity)) return;
    block_on_mbarrier(bar, parity);
}

void sim_tma_load_2d(void* dst, const void* tensor_map, int c0, int c1, void* bar) {
    Thread* t = current_thread("cp.async.bulk.tensor");
    require_hopper(false, "cp.async.bulk.tensor");
    BlockState& b = *t->block;
    sim_tensor_map map;
    memcpy(&map, tensor_map, sizeof map);
    if (map.magic != SIM_TENSOR_MAP_MAGIC)
        fail(ERR_LAUNCH_FAILED, "cp.async.bulk.tensor: the tensor map operand is not one cuTensorMapEncodeTiled made");
    if (map.rank != 2) fail(ERR_LAUNCH_FAILED, "cp.async.bulk.tensor.2d with a tensor map of rank " + std::to_string(map.rank));
    Mbarrier& m = barrier_at(b, bar, "cp.async.bulk.tensor's mbarrier::complete_tx");
    const size_t es = map.elem_size, row_bytes = (size_t)map.box[0] * es, bytes = row_bytes * map.box[1];
    const size_t align = map.swizzle ? 1024 : 128;
    check_alignment(dst, align, map.swizzle ? "TMA destination (swizzled: 1024 bytes)" : "TMA destination");
    if (!in_shared((uint8_t*)dst, bytes))
        fail(ERR_ILLEGAL_ADDRESS, "cp.async.bulk.tensor: the " + std::to_string(bytes) + "-byte box at " + shared_name(b, dst) +
                                      " does not fit in this block's shared memory");
    if (shared_inflight((uint8_t*)dst, bytes))
        fail(ERR_LAUNCH_FAILED, "cp.async.bulk.tensor into " + shared_name(b, dst) + ", which another asynchronous copy is still writing");
    // Gather the box now (elements outside the tensor read as zero, or NaN with the NaN fill),
    // placed as the swizzle puts it; it lands when the barrier is waited on.
    TmaCopy copy;
    copy.dst = (uint8_t*)dst;
    copy.bytes.assign(bytes, 0);
    const uint32_t span = map.swizzle == 3 ? 128 : map.swizzle == 2 ? 64 : map.swizzle == 1 ? 32 : 0;
    for (uint32_t r = 0; r < map.box[1]; r++) {
        const int64_t y = (int64_t)c1 + r;
        for (uint32_t i = 0; i < map.box[0]; i++) {
            const int64_t x = (int64_t)c0 + i;
            uintptr_t logical = (uintptr_t)dst + r * row_bytes + i * es;
            uintptr_t a = span ? logical ^ (((logical >> 7) & (span / 16 - 1)) << 4) : logical;
            uint8_t* out = copy.bytes.data() + (a - (uintptr_t)dst);
            if (x < 0 || y < 0 || (uint64_t)x >= map.dims[0] || (uint64_t)y >= map.dims[1]) {
                if (map.oob_nan) memset(out, 0xff, es);
                continue;
            }
            const uint8_t* src = (const uint8_t*)(uintptr_t)(map.address + (uint64_t)y * map.strides[0] + (uint64_t)x * es);
            check_global(src, es, false, "TMA source");
            memcpy(out, src, es);
        }
    }
    cp_async_mark_inflight((uint8_t*)dst, bytes, 1);
    m.copies.push_back(std::move(copy));
}

}  // extern "C"

namespace {
// Issues this thread's share of a warpgroup wgmma (the op is created by the warpgroup's first
// thread to reach it, which checks the shared-memory operands are settled) and returns it.
WgmmaOp& issue_wgmma(Thread* t, int type, int n, void* d, uint64_t desc_a, uint64_t desc_b, bool a_in_regs, int scale_d) {
    require_hopper(true, "wgmma.mma_async");
    BlockState& b = *t->block;
    if (n < 8 || n > 256 || n % 8) fail(ERR_LAUNCH_FAILED, "wgmma with N = " + std::to_string(n));
    require_whole_warpgroup(*t, "wgmma");
    WarpGroup& g = warpgroup_of(*t);
    const uint64_t index = t->wgmma_issued++;
    if (index < g.base) sim_trap("wgmma op bookkeeping");
    if (index - g.base == g.ops.size()) {
        WgmmaOp op;
        op.type = type, op.n = n, op.desc_a = desc_a, op.desc_b = desc_b, op.a_in_regs = a_in_regs;
        if (a_in_regs) op.a_frag.assign(128 * 4, 0);
        if (!a_in_regs) check_operand(b, desc_a, 64, "A");
        check_operand(b, desc_b, n, "B");
        g.ops.push_back(std::move(op));
    } else {
        const WgmmaOp& op = g.ops[index - g.base];
        if (op.type != type || op.n != n || op.desc_a != desc_a || op.desc_b != desc_b || op.a_in_regs != a_in_regs)
            fail(ERR_LAUNCH_FAILED, "the threads of a warpgroup issued different wgmma operations (shape, operand sources or "
                                    "descriptors differ: wgmma is warpgroup-wide and .aligned)");
    }
    t->wgmma_open.push_back(WgmmaPart{index, d, scale_d != 0});
    WgmmaOp& op = g.ops[index - g.base];
    // A wgmma completes only once its whole warpgroup has issued it: wake the threads that wait for it.
    if (++op.issued == 128)
        for (Thread& w : *b.threads)
            if (w.state == ThreadState::WgmmaWait && w.warp / 4 == t->warp / 4 && w.wait_op == index) w.state = ThreadState::Runnable;
    return op;
}

void complete_fragment_gather(BlockState&, Warp&, unsigned, unsigned) {}
}  // namespace

extern "C" {
void sim_wgmma(int type, int n, void* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
    issue_wgmma(current_thread("wgmma"), type, n, d, desc_a, desc_b, false, scale_d);
}

void sim_wgmma_rs(int type, int n, void* d, const unsigned* a, uint64_t desc_b, int scale_d) {
    Thread* t = current_thread("wgmma");
    if (type == SIM_WGMMA_S8) fail(ERR_LAUNCH_FAILED, "wgmma with A in registers is emulated for bf16 and e4m3 operands only");
    WgmmaOp& op = issue_wgmma(t, type, n, d, 0, desc_b, true, scale_d);
    for (int r = 0; r < 4; r++) op.a_frag[((t->warp % 4) * 32 + t->lane) * 4 + r] = a[r];
    // The warp's fragments are all in before any of its lanes can retire the op (wgmma is .sync.aligned).
    warp_collective(Collective::Wgmma, 0xffffffffu, 0, complete_fragment_gather);
}

void sim_wgmma_commit() {
    Thread* t = current_thread("wgmma.commit_group");
    t->wgmma_groups.push_back(std::move(t->wgmma_open));
    t->wgmma_open.clear();
}

void sim_wgmma_wait(int pending) {
    Thread* t = current_thread("wgmma.wait_group");
    while ((int)t->wgmma_groups.size() > pending) {
        for (const WgmmaPart& part : t->wgmma_groups.front()) {
            WarpGroup& g = warpgroup_of(*t);
            if (g.ops[part.op - g.base].issued < 128) block_on_wgmma(part.op);
            retire(*t, part);
        }
        t->wgmma_groups.pop_front();
    }
}
}
