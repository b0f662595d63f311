// The host builds of the kernel modules: for each target, one shared object per kernels/*.cu
// (cuda-sim/Makefile), in kernels/<target>/ beside this library. Each is loaded on first use
// and indexed by kernel name; its TLS block holds the static __shared__ arrays of its kernels.
#include <dirent.h>
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <map>
#include <memory>

#include "runtime.h"

namespace sim {
namespace {

struct Target {
    bool loaded = false;
    std::string error;
    std::map<std::string, HostKernel> kernels;
};

std::mutex g_mu;
std::map<std::string, Target> g_targets;
std::vector<std::pair<uintptr_t, uintptr_t>> g_images;  // [lo, hi) of every loaded module

std::string library_dir() {
    Dl_info info;
    if (!dladdr((void*)&library_dir, &info) || !info.dli_fname) return ".";
    std::string path = info.dli_fname;
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

struct PhdrQuery {
    uintptr_t base;
    size_t tls_size;
    std::vector<std::pair<uintptr_t, uintptr_t>> segments;
};

int phdr_callback(dl_phdr_info* info, size_t, void* data) {
    PhdrQuery* q = (PhdrQuery*)data;
    if (info->dlpi_addr != q->base) return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const auto& ph = info->dlpi_phdr[i];
        if (ph.p_type == PT_TLS) q->tls_size = ph.p_memsz;
        if (ph.p_type == PT_LOAD) q->segments.push_back({info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz});
    }
    return 1;
}

void load_target(const std::string& target, Target& t) {
    t.loaded = true;
    std::string dir = library_dir() + "/kernels/" + target;
    DIR* d = opendir(dir.c_str());
    if (!d) {
        t.error = "the emulator has no host build of the kernels for " + target + " (" + dir + " is missing)";
        return;
    }
    std::vector<std::string> files;
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n.size() > 3 && n.compare(n.size() - 3, 3, ".so") == 0) files.push_back(dir + "/" + n);
    }
    closedir(d);
    std::sort(files.begin(), files.end());
    for (const std::string& f : files) {
        void* h = dlopen(f.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            t.error = std::string("loading ") + f + ": " + dlerror();
            return;
        }
        auto table_fn = (sim_module_table_fn)dlsym(h, SIM_MODULE_TABLE_SYMBOL);
        if (!table_fn) {
            t.error = f + " has no kernel table";
            return;
        }
        size_t modid = 0;
        dlinfo(h, RTLD_DI_TLS_MODID, &modid);
        link_map* lm = nullptr;
        dlinfo(h, RTLD_DI_LINKMAP, &lm);
        PhdrQuery q{lm ? (uintptr_t)lm->l_addr : 0, 0, {}};
        dl_iterate_phdr(phdr_callback, &q);
        for (auto& s : q.segments) g_images.push_back(s);
        const sim_module_table* table = table_fn();
        for (int i = 0; i < table->count; i++) {
            const sim_kernel_entry& k = table->kernels[i];
            t.kernels[k.name] = HostKernel{k.name, k.thunk, k.param_sizes, k.param_count, h, modid, q.tls_size};
        }
    }
}

}  // namespace

const HostKernel* host_kernel(const std::string& target, const std::string& name, std::string* why) {
    std::lock_guard lock(g_mu);
    Target& t = g_targets[target];
    if (!t.loaded) load_target(target, t);
    if (!t.error.empty()) {
        *why = t.error;
        return nullptr;
    }
    auto it = t.kernels.find(name);
    if (it == t.kernels.end()) {
        *why = "kernel " + name + " is in the image but not in the emulator's host build for " + target +
               " (rebuild it: scripts/with-cuda-sim.sh does)";
        return nullptr;
    }
    return &it->second;
}

bool in_module_image(uintptr_t addr) {
    std::lock_guard lock(g_mu);
    for (auto& s : g_images)
        if (addr >= s.first && addr < s.second) return true;
    return false;
}

}  // namespace sim
