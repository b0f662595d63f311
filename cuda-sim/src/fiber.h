// User-space fibers: one per emulated CUDA thread, switched at barriers and warp collectives.
// x86-64 and AArch64 use a small assembly switch (callee-saved registers and the FP control
// words only); other platforms fall back to ucontext.
#pragma once
#include <cstddef>

namespace sim {

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
};

using FiberEntry = void (*)(void* arg);

// Prepare `f` to start running entry(arg) on the stack [stack, stack + size) at its first switch.
void fiber_init(Fiber& f, void* stack, size_t size, FiberEntry entry, void* arg);
// Save the running context into `from`, resume `to`.
void fiber_switch(Fiber& from, Fiber& to);

}  // namespace sim
