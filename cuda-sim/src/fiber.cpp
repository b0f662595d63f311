#include "fiber.h"

#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__)
// sim_fiber_switch(void** save_sp, void* new_sp): push callee-saved registers and MXCSR/x87
// control word, store rsp, load the other stack, pop in reverse.
asm(R"(
.text
.globl sim_fiber_switch
.hidden sim_fiber_switch
.type sim_fiber_switch,@function
sim_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size sim_fiber_switch,.-sim_fiber_switch

.globl sim_fiber_start
.hidden sim_fiber_start
.type sim_fiber_start,@function
sim_fiber_start:
    movq %r13, %rdi
    callq *%r12
    ud2
.size sim_fiber_start,.-sim_fiber_start
)");
extern "C" void sim_fiber_switch(void** save_sp, void* new_sp);
extern "C" void sim_fiber_start();

namespace sim {
void fiber_init(Fiber& f, void* stack, size_t size, FiberEntry entry, void* arg) {
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = (uint64_t)&sim_fiber_start;   // return address of the first switch: after its `ret`,
                                          // rsp = top (16-aligned) for the call into `entry`
    *--sp = 0;                            // rbp
    *--sp = 0;                            // rbx
    *--sp = (uint64_t)entry;              // r12
    *--sp = (uint64_t)arg;                // r13
    *--sp = 0;                            // r14
    *--sp = 0;                            // r15
    uint32_t ctl[2];
    asm volatile("stmxcsr %0" : "=m"(ctl[0]));
    asm volatile("fnstcw %0" : "=m"(ctl[1]));
    *--sp = (uint64_t)ctl[0] | ((uint64_t)(ctl[1] & 0xffff) << 32);
    f.sp = sp;
}
void fiber_switch(Fiber& from, Fiber& to) { sim_fiber_switch(&from.sp, to.sp); }
}  // namespace sim

#elif defined(__aarch64__)
asm(R"(
.text
.globl sim_fiber_switch
.hidden sim_fiber_switch
.type sim_fiber_switch,%function
sim_fiber_switch:
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mrs x9, fpcr
    str x9, [sp, #160]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldr x9, [sp, #160]
    msr fpcr, x9
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #176
    ret
.size sim_fiber_switch,.-sim_fiber_switch

.globl sim_fiber_start
.hidden sim_fiber_start
.type sim_fiber_start,%function
sim_fiber_start:
    mov x0, x20
    blr x19
    brk #0
.size sim_fiber_start,.-sim_fiber_start
)");
extern "C" void sim_fiber_switch(void** save_sp, void* new_sp);
extern "C" void sim_fiber_start();

namespace sim {
void fiber_init(Fiber& f, void* stack, size_t size, FiberEntry entry, void* arg) {
    uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(top - 176);
    for (int i = 0; i < 22; i++) sp[i] = 0;
    sp[0] = (uint64_t)entry;             // x19
    sp[1] = (uint64_t)arg;               // x20
    sp[11] = (uint64_t)&sim_fiber_start; // x30 (return address)
    uint64_t fpcr;
    asm volatile("mrs %0, fpcr" : "=r"(fpcr));
    sp[20] = fpcr;
    f.sp = sp;
}
void fiber_switch(Fiber& from, Fiber& to) { sim_fiber_switch(&from.sp, to.sp); }
}  // namespace sim

#else
#include <ucontext.h>
namespace sim {
namespace {
struct UFiber {
    ucontext_t ctx;
    FiberEntry entry;
    void* arg;
};
void ustart(unsigned lo, unsigned hi) {
    UFiber* u = (UFiber*)(((uintptr_t)hi << 32) | lo);
    u->entry(u->arg);
    abort();
}
}  // namespace
void fiber_init(Fiber& f, void* stack, size_t size, FiberEntry entry, void* arg) {
    // The ucontext lives at the bottom of the fiber's own stack.
    UFiber* u = (UFiber*)stack;
    getcontext(&u->ctx);
    u->ctx.uc_stack.ss_sp = (char*)stack + sizeof(UFiber);
    u->ctx.uc_stack.ss_size = size - sizeof(UFiber);
    u->ctx.uc_link = nullptr;
    u->entry = entry;
    u->arg = arg;
    uintptr_t p = (uintptr_t)u;
    makecontext(&u->ctx, (void (*)())ustart, 2, (unsigned)p, (unsigned)(p >> 32));
    f.sp = u;
}
void fiber_switch(Fiber& from, Fiber& to) {
    static thread_local UFiber main_ctx;
    UFiber* save = from.sp ? (UFiber*)from.sp : &main_ctx;
    from.sp = save;
    swapcontext(&save->ctx, &((UFiber*)to.sp)->ctx);
}
}  // namespace sim
#endif
