// Emulated PTX: the instructions behind kernels/common.cuh's wrappers and the warp built-ins,
// from the PTX ISA's definitions. Each checks its operands as the hardware would fault on them.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "runtime.h"

namespace sim {
namespace {

// ---- cp.async (cp.async.cg/ca.shared.global [dst], [src], cp-size, src-size) ----
void land(Thread& t, const CpAsyncOp& op) {
    cp_async_mark_inflight(op.dst, op.size, -1);
    uint8_t bytes[16] = {0};
    if (op.src_bytes) memcpy(bytes, op.src, op.src_bytes);
    shared_access(op.dst, op.size, true, &t, "cp.async");
    memcpy(op.dst, bytes, op.size);
}

// ---- warp collectives: completion functions run by the last lane to arrive ----
Thread& lane_thread(BlockState& b, Warp& w, unsigned lane) {
    size_t warp_index = &w - b.warps.data();
    return (*b.threads)[warp_index * 32 + lane];
}

void complete_shfl(BlockState& b, Warp& w, unsigned mask, unsigned) {
    for (unsigned lane = 0; lane < 32; lane++) {
        if (!((mask >> lane) & 1)) continue;
        Thread& t = lane_thread(b, w, lane);
        int width = t.in_arg2;
        unsigned seg = lane & ~(unsigned)(width - 1), in_seg = lane & (unsigned)(width - 1);
        int src = (int)lane;
        switch (w.mode) {
            case SIM_SHFL_IDX: src = (int)(seg + ((unsigned)t.in_arg & (unsigned)(width - 1))); break;
            case SIM_SHFL_UP: src = in_seg >= (unsigned)t.in_arg ? (int)lane - t.in_arg : (int)lane; break;
            case SIM_SHFL_DOWN: src = in_seg + (unsigned)t.in_arg < (unsigned)width ? (int)lane + t.in_arg : (int)lane; break;
            case SIM_SHFL_XOR: {
                unsigned s = lane ^ (unsigned)t.in_arg;
                src = (s & ~(unsigned)(width - 1)) == seg ? (int)s : (int)lane;
                break;
            }
        }
        if (!((mask >> src) & 1)) {
            worker()->current = &t;
            fail(ERR_LAUNCH_FAILED, "shuffle at line " + std::to_string(w.line) + ": lane " + std::to_string(lane) +
                                        " reads lane " + std::to_string(src) + ", which is not in the mask (undefined)");
        }
        t.out_value = lane_thread(b, w, (unsigned)src).in_value;
    }
}

void complete_vote(BlockState& b, Warp& w, unsigned mask, unsigned) {
    unsigned ballot = 0;
    for (unsigned lane = 0; lane < 32; lane++)
        if (((mask >> lane) & 1) && lane_thread(b, w, lane).in_arg) ballot |= 1u << lane;
    uint64_t r = w.mode == SIM_VOTE_BALLOT ? ballot : w.mode == SIM_VOTE_ANY ? (ballot != 0) : (ballot == mask);
    for (unsigned lane = 0; lane < 32; lane++)
        if ((mask >> lane) & 1) lane_thread(b, w, lane).out_value = r;
}

void complete_nothing(BlockState&, Warp&, unsigned, unsigned) {}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row
// addresses of matrix i; lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of each matrix
// (with .trans: column l/4, rows 2(l%4), 2(l%4)+1).
void complete_ldmatrix(BlockState& b, Warp& w, unsigned, unsigned) {
    int matrices = lane_thread(b, w, 0).in_arg, trans = lane_thread(b, w, 0).in_arg2;
    uint16_t m[4][8][8];
    Thread* arriving = worker()->current;
    for (int i = 0; i < matrices; i++)
        for (int r = 0; r < 8; r++) {
            Thread& src = lane_thread(b, w, (unsigned)(8 * i + r));
            uint8_t* row = (uint8_t*)src.in_ptr;
            worker()->current = &src;  // report and record the access as the lane that gave it
            if ((uintptr_t)row % 16)
                fail(ERR_MISALIGNED_ADDRESS, "ldmatrix row address " + std::to_string((uintptr_t)row) + " is not 16-byte aligned");
            shared_access(row, 16, false, &src, "ldmatrix");
            memcpy(m[i][r], row, 16);
        }
    worker()->current = arriving;
    for (unsigned lane = 0; lane < 32; lane++) {
        Thread& t = lane_thread(b, w, lane);
        for (int i = 0; i < matrices; i++) {
            uint16_t lo, hi;
            if (trans) {
                lo = m[i][2 * (lane % 4)][lane / 4];
                hi = m[i][2 * (lane % 4) + 1][lane / 4];
            } else {
                lo = m[i][lane / 4][2 * (lane % 4)];
                hi = m[i][lane / 4][2 * (lane % 4) + 1];
            }
            t.out_regs[i] = (unsigned)lo | ((unsigned)hi << 16);
        }
    }
}

float bf16_lo(unsigned r) {
    uint32_t u = r << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
float bf16_hi(unsigned r) {
    uint32_t u = r & 0xffff0000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// D = A·B + C into every lane's accumulator fragment (m16n8): with g = lane/4, c = lane%4,
// d0 = D[g][2c], d1 = D[g][2c+1], d2 = D[g+8][2c], d3 = D[g+8][2c+1]; C arrives in in_f. Each dot
// product is summed exactly (double: the products of bf16/e4m3 values are exact) and rounded once
// when added to C (f32), or added as integers wrapping at 32 bits (s32).
void mma_accumulate(BlockState& b, Warp& w, const double (*A)[32], const double (*B)[8], int K, bool s32) {
    for (unsigned lane = 0; lane < 32; lane++) {
        Thread& t = lane_thread(b, w, lane);
        unsigned g = lane / 4, c = lane % 4;
        const unsigned rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * c, 2 * c + 1, 2 * c, 2 * c + 1};
        for (int e = 0; e < 4; e++) {
            double acc = 0;
            for (int k = 0; k < K; k++) acc += A[rows[e]][k] * B[k][cols[e]];
            if (s32) {
                int32_t c0;
                memcpy(&c0, &t.in_f[e], 4);
                uint32_t sum = (uint32_t)c0 + (uint32_t)(int64_t)acc;
                memcpy(&t.out_f[e], &sum, 4);
            } else {
                t.out_f[e] = (float)(acc + (double)t.in_f[e]);
            }
        }
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32. With g = lane/4, c = lane%4:
//   A (16x16): a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   B (16x8):  b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
//   C, D (16x8): d0 = D[g][2c], d1 = D[g][2c+1], d2 = D[g+8][2c], d3 = D[g+8][2c+1]
// (The tensor core's internal summation order and precision are not specified.)
void complete_mma_bf16(BlockState& b, Warp& w, unsigned, unsigned) {
    double A[16][32], B[32][8];
    for (unsigned lane = 0; lane < 32; lane++) {
        Thread& t = lane_thread(b, w, lane);
        unsigned g = lane / 4, c = lane % 4;
        mma_a_fragment(t.in_regs, lane, nullptr, A);
        B[2 * c][g] = bf16_lo((unsigned)t.in_value), B[2 * c + 1][g] = bf16_hi((unsigned)t.in_value);
        B[2 * c + 8][g] = bf16_lo((unsigned)(t.in_value >> 32)), B[2 * c + 9][g] = bf16_hi((unsigned)(t.in_value >> 32));
    }
    mma_accumulate(b, w, A, B, 16, false);
}

// mma.sync.aligned.m16n8k32.row.col with 8-bit A and B (4 per register). With g = lane/4,
// c = lane%4: a0 = A[g][4c..4c+3], a1 = A[g+8][4c..], a2 = A[g][4c+16..], a3 = A[g+8][4c+16..];
// b0 = B[4c..4c+3][g], b1 = B[4c+16..4c+19][g]; C and D as in m16n8k16.
thread_local int g_mma8_type;
void complete_mma_8bit(BlockState& b, Warp& w, unsigned, unsigned) {
    double A[16][32], B[32][8];
    double (*code)(uint8_t) = g_mma8_type == SIM_MMA_S8 ? +[](uint8_t v) { return (double)(int8_t)v; } : e4m3_value;
    for (unsigned lane = 0; lane < 32; lane++) {
        Thread& t = lane_thread(b, w, lane);
        unsigned g = lane / 4, c = lane % 4;
        mma_a_fragment(t.in_regs, lane, code, A);
        for (int i = 0; i < 4; i++) {
            B[4 * c + i][g] = code((uint8_t)(t.in_value >> (8 * i)));
            B[4 * c + 16 + i][g] = code((uint8_t)(t.in_value >> (32 + 8 * i)));
        }
    }
    mma_accumulate(b, w, A, B, 32, g_mma8_type == SIM_MMA_S8);
}

// An instruction the kernel's image architecture lacks faults, as the JIT or ptxas would refuse it.
void require_arch(int min_arch, const char* instruction) {
    const Function& f = *worker()->block->fn;
    if (f.image_arch < min_arch)
        fail(ERR_ILLEGAL_INSTRUCTION, std::string(instruction) + " needs sm_" + std::to_string(min_arch) +
                                          " or newer; this kernel's image is for sm_" + std::to_string(f.image_arch));
}

void require_full_warp(Thread* t, const char* what) {
    BlockState& b = *t->block;
    if (b.nthreads - t->warp * 32 < 32)
        fail(ERR_LAUNCH_FAILED, std::string(what) + " needs all 32 lanes of the warp, and the block's last warp is partial");
}

template <typename T>
T apply(int op, T old, T v, T cmp) {
    switch (op) {
        case SIM_ATOMIC_ADD: return old + v;
        case SIM_ATOMIC_MAX: return old > v ? old : v;
        case SIM_ATOMIC_MIN: return old < v ? old : v;
        case SIM_ATOMIC_EXCH: return v;
        case SIM_ATOMIC_CAS: return old == cmp ? v : old;
        default: break;
    }
    if constexpr (std::is_integral_v<T>) {
        if (op == SIM_ATOMIC_AND) return old & v;
        if (op == SIM_ATOMIC_OR) return old | v;
        if (op == SIM_ATOMIC_XOR) return old ^ v;
    }
    sim_trap("atomic operation not defined for this type");
}

template <typename T>
uint64_t rmw(int op, void* p, uint64_t vbits, uint64_t cbits) {
    T old, v, cmp;
    memcpy(&old, p, sizeof(T));
    memcpy(&v, &vbits, sizeof(T));
    memcpy(&cmp, &cbits, sizeof(T));
    T now = apply<T>(op, old, v, cmp);
    memcpy(p, &now, sizeof(T));
    uint64_t r = 0;
    memcpy(&r, &old, sizeof(T));
    return r;
}

}  // namespace

void cp_async_complete_all(Thread& t) {
    while (!t.groups.empty()) {
        for (const CpAsyncOp& op : t.groups.front()) land(t, op);
        t.groups.pop_front();
    }
    for (const CpAsyncOp& op : t.open_group) land(t, op);
    t.open_group.clear();
}

// Register r of lane l holds row l/4 + 8(r & 1) of A, from column E(l % 4) + 4E(r >> 1) on, E elements
// per register low bytes first: E = 2 bf16 (m16n8k16) or 4 bytes (m16n8k32, decoded by `code`).
void mma_a_fragment(const unsigned regs[4], unsigned lane, double (*code)(uint8_t), double (*A)[32]) {
    const unsigned e = code ? 4 : 2, row = lane / 4;
    for (unsigned r = 0; r < 4; r++) {
        double* out = &A[row + 8 * (r & 1)][e * (lane % 4) + 4 * e * (r >> 1)];
        for (unsigned i = 0; i < e; i++)
            out[i] = code ? code((uint8_t)(regs[r] >> (8 * i))) : (i ? bf16_hi(regs[r]) : bf16_lo(regs[r]));
    }
}

}  // namespace sim

using namespace sim;

extern "C" {
void sim_cp_async(void* dst, const void* src, int cp_size, int src_bytes) {
    Thread* t = current_thread("cp.async");
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) sim_trap("cp.async size must be 4, 8 or 16");
    if (src_bytes < 0 || src_bytes > cp_size)
        fail(ERR_LAUNCH_FAILED, "cp.async src-size " + std::to_string(src_bytes) + " is outside 0.." + std::to_string(cp_size));
    check_alignment(dst, (size_t)cp_size, "cp.async shared destination");
    if (!in_shared((uint8_t*)dst, (size_t)cp_size))
        fail(ERR_ILLEGAL_ADDRESS, "cp.async destination is not in this block's shared memory");
    if (src_bytes) {
        check_alignment(src, (size_t)cp_size, "cp.async global source");
        check_global(src, (size_t)src_bytes, false, "cp.async source");
    }
    cp_async_mark_inflight((uint8_t*)dst, (size_t)cp_size, 1);
    t->open_group.push_back(CpAsyncOp{(uint8_t*)dst, (const uint8_t*)src, cp_size, src_bytes});
}

void sim_cp_async_commit() {
    Thread* t = current_thread("cp.async.commit_group");
    t->groups.push_back(std::move(t->open_group));
    t->open_group.clear();
}

void sim_cp_async_wait(int pending) {
    Thread* t = current_thread("cp.async.wait_group");
    while ((int)t->groups.size() > pending) {
        for (const CpAsyncOp& op : t->groups.front()) land(*t, op);
        t->groups.pop_front();
    }
}

void sim_ldmatrix(unsigned* regs, const void* row, int matrices, int trans) {
    Thread* t = current_thread("ldmatrix");
    require_full_warp(t, "ldmatrix");
    t->in_ptr = row;
    t->in_arg = matrices;
    t->in_arg2 = trans;
    warp_collective(Collective::LdMatrix, 0xffffffffu, 0, complete_ldmatrix);
    for (int i = 0; i < matrices; i++) regs[i] = t->out_regs[i];
}

void sim_mma_bf16_m16n8k16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    Thread* t = current_thread("mma.sync");
    require_full_warp(t, "mma.sync");
    for (int i = 0; i < 4; i++) t->in_regs[i] = a[i], t->in_f[i] = d[i];
    t->in_value = (uint64_t)b0 | ((uint64_t)b1 << 32);
    warp_collective(Collective::Mma, 0xffffffffu, 0, complete_mma_bf16);
    for (int i = 0; i < 4; i++) d[i] = t->out_f[i];
}

void sim_mma_8bit_m16n8k32(void* d, const unsigned* a, unsigned b0, unsigned b1, int type) {
    Thread* t = current_thread("mma.sync m16n8k32");
    require_arch(type == SIM_MMA_E4M3 ? 89 : 80, type == SIM_MMA_E4M3 ? "mma.sync .e4m3" : "mma.sync .s8");
    require_full_warp(t, "mma.sync");
    for (int i = 0; i < 4; i++) t->in_regs[i] = a[i];
    memcpy(t->in_f, d, 16);
    t->in_value = (uint64_t)b0 | ((uint64_t)b1 << 32);
    g_mma8_type = type;  // fibers of a block share one OS thread: no other warp runs in between
    warp_collective(Collective::Mma, 0xffffffffu, 0, complete_mma_8bit);
    memcpy(d, t->out_f, 16);
}

uint64_t sim_shfl(int mode, unsigned mask, uint64_t value, int lane_or_delta, int width, int line) {
    Thread* t = current_thread("__shfl_sync");
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail(ERR_LAUNCH_FAILED, "shuffle width " + std::to_string(width) + " is not a power of two up to 32");
    t->in_value = value;
    t->in_arg = lane_or_delta;
    t->in_arg2 = width;
    t->block->warps[t->warp].mode = mode;  // set by every lane; a mismatch is caught below
    warp_collective(Collective::Shfl, mask, line, complete_shfl);
    return t->out_value;
}

unsigned sim_vote(int mode, unsigned mask, int predicate, int line) {
    Thread* t = current_thread("vote");
    t->in_arg = predicate;
    t->block->warps[t->warp].mode = mode;
    warp_collective(Collective::Vote, mask, line, complete_vote);
    return (unsigned)t->out_value;
}

void sim_syncwarp(unsigned mask, int line) {
    current_thread("__syncwarp");
    warp_collective(Collective::SyncWarp, mask, line, complete_nothing);
}

uint64_t sim_atomic(int op, int type, void* p, uint64_t value, uint64_t compare) {
    Thread* t = current_thread("atomic");
    static const size_t sizes[] = {4, 4, 8, 8, 4, 8};
    size_t size = sizes[type];
    check_alignment(p, size, "atomic");
    if (in_shared((uint8_t*)p, size)) {
        // Atomics do not race with each other; block-local, so no ordering across blocks.
        (void)t;
    } else {
        check_global(p, size, true, "atomic");
        wait_atomic_turn();
    }
    switch (type) {
        case SIM_I32: return rmw<int32_t>(op, p, value, compare);
        case SIM_U32: return rmw<uint32_t>(op, p, value, compare);
        case SIM_I64: return rmw<int64_t>(op, p, value, compare);
        case SIM_U64: return rmw<uint64_t>(op, p, value, compare);
        case SIM_F32: return rmw<float>(op, p, value, compare);
        case SIM_F64: return rmw<double>(op, p, value, compare);
    }
    sim_trap("atomic of an unknown type");
}
}
