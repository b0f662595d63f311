// Device profiles (FLUX2_SIM_ARCH): the attributes of the card each compute capability stands
// for, as its driver reports them. FLUX2_SIM_MEMORY overrides the memory size.
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime.h"

namespace sim {
namespace {
constexpr size_t GiB = 1ull << 30;
const Profile PROFILES[] = {
    // arch, card, cc, 'a', SMs, threads/SM, smem/block, opt-in, smem/SM, regs/block, regs/SM, memory, clocks, bus, L2
    {"sm_80", "NVIDIA A100-SXM4-80GB", 8, 0, false, 108, 2048, 49152, 166912, 167936, 65536, 65536, 80 * GiB, 1410000, 1593000, 5120, 41943040},
    {"sm_86", "NVIDIA GeForce RTX 3090", 8, 6, false, 82, 1536, 49152, 101376, 102400, 65536, 65536, 24 * GiB, 1695000, 9751000, 384, 6291456},
    {"sm_89", "NVIDIA GeForce RTX 4090", 8, 9, false, 128, 1536, 49152, 101376, 102400, 65536, 65536, 24 * GiB, 2520000, 10501000, 384, 75497472},
    {"sm_90a", "NVIDIA H100 80GB HBM3", 9, 0, true, 132, 2048, 49152, 232448, 233472, 65536, 65536, 80 * GiB, 1980000, 2619000, 5120, 52428800},
    {"sm_120", "NVIDIA GeForce RTX 5090", 12, 0, false, 170, 1536, 49152, 101376, 102400, 65536, 65536, 32 * GiB, 2407000, 14001000, 512, 100663296},
};

const Profile& choose() {
    const char* want = getenv("FLUX2_SIM_ARCH");
    if (!want || !*want) want = "sm_90a";
    for (const Profile& p : PROFILES)
        if (strcmp(p.arch, want) == 0) return p;
    fprintf(stderr, "cuda-sim: FLUX2_SIM_ARCH=%s is not a profile (sm_80, sm_86, sm_89, sm_90a, sm_120)\n", want);
    exit(2);
}

// "16GiB", "512MiB", "8G", "1048576".
size_t parse_size(const char* s) {
    char* end = nullptr;
    double v = strtod(s, &end);
    std::string unit(end ? end : "");
    for (auto& c : unit) c = (char)tolower(c);
    double mul = 1;
    if (unit == "k" || unit == "kb" || unit == "kib") mul = 1024.0;
    else if (unit == "m" || unit == "mb" || unit == "mib") mul = 1024.0 * 1024;
    else if (unit == "g" || unit == "gb" || unit == "gib") mul = 1024.0 * 1024 * 1024;
    else if (!unit.empty() && unit != "b") {
        fprintf(stderr, "cuda-sim: FLUX2_SIM_MEMORY=%s: unknown unit\n", s);
        exit(2);
    }
    if (!(v > 0)) {
        fprintf(stderr, "cuda-sim: FLUX2_SIM_MEMORY=%s is not a positive size\n", s);
        exit(2);
    }
    return (size_t)(v * mul);
}
}  // namespace

const Profile& profile() {
    static const Profile& p = choose();
    return p;
}

size_t device_memory() {
    static size_t bytes = [] {
        const char* s = getenv("FLUX2_SIM_MEMORY");
        return s && *s ? parse_size(s) : profile().memory;
    }();
    return bytes;
}

std::string device_name() {
    // The backend recognises the emulator by this prefix (EMULATOR_NAME_PREFIX).
    return std::string("flux2 cuda-sim (") + profile().card + " profile, " + profile().arch + ")";
}

}  // namespace sim
