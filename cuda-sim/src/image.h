// Reads what cuModuleLoadData is handed: an NVRTC cubin (ELF, EM_CUDA) or PTX text. Only the facts the
// driver needs before running anything: target arch, kernel names and per-kernel resource metadata.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sim {

struct KernelImageInfo {
    std::string name;          // entry (kernel) name
    uint32_t static_smem = 0;  // bytes of static __shared__ the kernel declares (cubin: .nv.shared.<name> size less the
                               // sm_90+ system prefix, see shared_section; PTX: .shared declarations the entry uses)
    int regs = -1;             // registers per thread (cubin: EIATTR_REGCOUNT; sh_info >> 24 of .text.<name> holds it
                               // only up to sm_89), -1 for PTX
    uint32_t max_threads = 0;  // __launch_bounds__ max threads per block (cubin: EIATTR_MAX_THREADS / REQNTID in
                               // .nv.info.<name>; PTX: .maxntid / .reqntid x*y*z), 0 = none
    uint32_t local_bytes = 0;  // per-thread local memory (cubin: EIATTR_FRAME_SIZE; PTX: .local declarations), else 0
    uint32_t shared_section = 0;  // cubin only: raw .nv.shared.<name> size; from sm_90 ptxas places the kernel's
                                  // variables after a 1 KiB system-reserved prefix that this size includes
};

struct ImageInfo {
    bool is_ptx = false;
    int arch = 0;                // SM version as major*10+minor: 80, 86, 89, 90, 120 ...
    bool arch_specific = false;  // "a" target (sm_90a): runs only on exactly that arch
    bool family_specific = false;  // PTX "f" target (sm_120f): runs only within the same major (cubins can't tell)
    int elf_abi_version = 0;     // cubin: EI_ABIVERSION (NVRTC 12.9: 7 up to sm_90, 8 for sm_100+; it, not the
                                 // SM, picks the e_flags layout), 0 for PTX
    size_t size = 0;             // bytes of the image (ELF: from the headers; PTX: strlen)
    std::vector<KernelImageInfo> kernels;
};

// Parses the image at `data`. Never reads past the end of a well-formed image; returns false with a one-line
// reason in `error` for anything malformed (bad magic, truncated header, section table out of range, not
// EM_CUDA, PTX without .target ...). ELF size is found from the headers (the driver API gives no length).
bool parse_image(const void* data, ImageInfo& out, std::string& error);

// Same, but never reads beyond data[0, avail): a truncated image is rejected instead of over-read.
bool parse_image_bounded(const void* data, size_t avail, ImageInfo& out, std::string& error);

// Whether an image may be loaded on a device of compute capability major.minor (the real driver's rule):
// cubins run on the same major with minor >= the image's (sm_86 on sm_89 yes, sm_80 on sm_90 no), "a" images
// only on exactly their arch; PTX (JIT) runs on any device >= its target ("f" PTX: same major only).
bool image_runs_on(const ImageInfo& img, int major, int minor);

}  // namespace sim
