// Checks sim::parse_image against the real NVRTC images build.rs writes (OUT_DIR) and the kernel sources, plus
// truncated, corrupted and garbage inputs. Build with -fsanitize=address,undefined so any out-of-bounds read
// fails the run: every image sits in a heap buffer of exactly its size.
//
//   usage: image_parse_test OUT_DIR [KERNELS_DIR]     (KERNELS_DIR defaults to ./kernels)
#include "../src/image.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace fs = std::filesystem;
using Bytes = std::vector<uint8_t>;

static int g_passed = 0, g_failed = 0;

static void check(bool ok, const std::string& what) {
    if (ok) {
        ++g_passed;
    } else {
        ++g_failed;
        printf("FAIL: %s\n", what.c_str());
    }
}

static Bytes read_file(const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

static bool parse_bounded(const Bytes& b, sim::ImageInfo& info, std::string& err) {
    return sim::parse_image_bounded(b.data(), b.size(), info, err);
}

// A rejected input must come back false with a reason; it must not crash or over-read (the sanitizers watch).
static void expect_reject(const Bytes& b, const std::string& what) {
    sim::ImageInfo info;
    std::string err;
    const bool ok = parse_bounded(b, info, err);
    check(!ok && !err.empty() && err.find('\n') == std::string::npos,
          what + " is rejected (got: " + (ok ? "accepted" : err) + ")");
}

static Bytes text(const std::string& s) { return Bytes(s.c_str(), s.c_str() + s.size() + 1); }  // with its NUL

// ---- kernel sources: names and __launch_bounds__ -------------------------------------------------------------

static std::string strip_comments(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
        if (s.compare(i, 2, "//") == 0) {
            i = s.find('\n', i);
            if (i == std::string::npos) break;
        } else if (s.compare(i, 2, "/*") == 0) {
            i = s.find("*/", i);
            i = i == std::string::npos ? s.size() : i + 2;
        } else {
            out += s[i++];
        }
    }
    return out;
}

// C++ tokens, enough to spot kernel declarations: identifiers/numbers, string literals, single punctuation.
static std::vector<std::string> cxx_tokens(const std::string& s) {
    std::vector<std::string> out;
    auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
    for (size_t i = 0; i < s.size();) {
        const size_t start = i;
        if (std::isspace(static_cast<unsigned char>(s[i]))) {
            ++i;
            continue;
        }
        if (word(s[i])) {
            while (i < s.size() && word(s[i])) ++i;
        } else if (s[i] == '"') {
            i = s.find('"', i + 1);
            i = i == std::string::npos ? s.size() : i + 1;
        } else {
            ++i;
        }
        out.push_back(s.substr(start, i - start));
    }
    return out;
}

// Kernels declared as `extern "C" __global__ void [__launch_bounds__(N...)] NAME(`: name -> N (0 = no bounds,
// -1 = bounds that are not a plain number).
static std::map<std::string, long> source_kernels(const fs::path& cu) {
    const Bytes raw = read_file(cu);
    const std::vector<std::string> t = cxx_tokens(strip_comments(std::string(raw.begin(), raw.end())));
    std::map<std::string, long> out;
    for (size_t i = 0; i + 5 < t.size(); ++i) {
        if (t[i] != "extern" || t[i + 1] != "\"C\"" || t[i + 2] != "__global__" || t[i + 3] != "void") continue;
        size_t j = i + 4;
        long bounds = 0;
        if (t[j] == "__launch_bounds__" && j + 2 < t.size() && t[j + 1] == "(") {
            const std::string& n = t[j + 2];
            const bool number = !n.empty() && n.find_first_not_of("0123456789") == std::string::npos;
            bounds = number ? std::stol(n) : -1;
            while (j < t.size() && t[j] != ")") ++j;
            ++j;
        }
        if (j + 1 < t.size() && t[j + 1] == "(") out[t[j]] = bounds;
    }
    return out;
}

// ---- small ELF helpers to aim corruptions at the right bytes ------------------------------------------------

static uint64_t rd(const Bytes& b, size_t off, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = v << 8 | b[off + i];
    return v;
}
static void wr(Bytes& b, size_t off, int n, uint64_t v) {
    for (int i = 0; i < n; ++i) b[off + i] = uint8_t(v >> (8 * i));
}
// Offset of the section header named `name`, or 0.
static size_t section_header(const Bytes& b, const std::string& name) {
    const size_t shoff = rd(b, 40, 8), shnum = rd(b, 60, 2), shstrndx = rd(b, 62, 2);
    const size_t strs = rd(b, shoff + shstrndx * 64 + 24, 8);
    for (size_t i = 0; i < shnum; ++i)
        if (name == reinterpret_cast<const char*>(&b[strs + rd(b, shoff + i * 64, 4)])) return shoff + i * 64;
    return 0;
}
static size_t section_of_type(const Bytes& b, uint32_t type) {
    const size_t shoff = rd(b, 40, 8), shnum = rd(b, 60, 2);
    for (size_t i = 0; i < shnum; ++i)
        if (rd(b, shoff + i * 64 + 4, 4) == type) return shoff + i * 64;
    return 0;
}

// ---- the checks ---------------------------------------------------------------------------------------------

struct Image {
    std::string module, target, file;
    Bytes bytes;
    sim::ImageInfo info;
};

static void check_real_image(Image& im, const std::map<std::string, long>& src, const std::string& label) {
    const bool is_ptx = im.target.rfind("compute_", 0) == 0;
    if (is_ptx && (im.bytes.empty() || im.bytes.back() != 0)) im.bytes.push_back(0);  // the driver API wants a NUL
    std::string err;
    const bool ok = sim::parse_image(im.bytes.data(), im.info, err);
    check(ok, label + " parses: " + err);
    if (!ok) return;
    sim::ImageInfo bounded;
    check(parse_bounded(im.bytes, bounded, err) && bounded.size == im.info.size &&
              bounded.kernels.size() == im.info.kernels.size(),
          label + " parses the same with a length");

    const sim::ImageInfo& in = im.info;
    const std::string digits = im.target.substr(im.target.find('_') + 1);
    const int arch = std::stoi(digits);
    const bool specific = digits.back() == 'a';
    check(in.is_ptx == is_ptx, label + " kind");
    check(in.arch == arch, label + " arch " + std::to_string(in.arch) + " == " + std::to_string(arch));
    check(in.arch_specific == specific, label + " arch_specific");
    if (is_ptx) {
        check(in.size == strlen(reinterpret_cast<const char*>(im.bytes.data())), label + " size == strlen");
    } else {
        check(in.size == im.bytes.size(), label + " size " + std::to_string(in.size) + " == file size " +
                                              std::to_string(im.bytes.size()));
        check(in.elf_abi_version == (arch >= 100 ? 8 : 7), label + " ELF ABI version");
    }

    std::set<std::string> want, got;
    for (const auto& [name, bounds] : src) want.insert(name);
    for (const auto& k : in.kernels) got.insert(k.name);
    std::string got_list;
    for (const auto& n : got) got_list += " " + n;
    check(want == got, label + " kernel names match the source (got:" + got_list + ")");

    for (const auto& k : in.kernels) {
        const std::string kl = label + " " + k.name;
        auto s = src.find(k.name);
        if (s != src.end() && s->second >= 0)
            check(k.max_threads == uint32_t(s->second),
                  kl + " max_threads " + std::to_string(k.max_threads) + " == " + std::to_string(s->second));
        check(is_ptx ? k.regs == -1 : (k.regs > 0 && k.regs <= 255), kl + " regs " + std::to_string(k.regs));
        static const std::map<std::string, uint32_t> smem = {{"gemm_tiled_bf16", 2 * 16 * 17 * 4},
                                                             {"gemm_mma_bf16", 2 * 2 * 128 * 40 * 2},
                                                             {"flash_attention_d64_bf16", 0},
                                                             {"flash_attention_d128_bf16", 0}};
        if (auto m = smem.find(k.name); m != smem.end())
            check(k.static_smem == m->second,
                  kl + " static_smem " + std::to_string(k.static_smem) + " == " + std::to_string(m->second));
    }
}

static void check_truncation(const Image& im, const std::string& label) {
    const Bytes& b = im.bytes;
    const size_t n = b.size(), shoff = rd(b, 40, 8);
    for (size_t cut : {size_t(0), size_t(1), size_t(4), size_t(63), size_t(64), size_t(65), n / 4, n / 2, shoff,
                       shoff + 64, n - 57, n - 1}) {
        if (cut >= n) continue;
        expect_reject(Bytes(b.begin(), b.begin() + cut), label + " cut at " + std::to_string(cut));
    }
}

static void check_corruptions(const Image& im, const std::string& label) {
    const Bytes& good = im.bytes;
    struct Corruption {
        const char* what;
        size_t off;
        int n;
        uint64_t value;
    };
    const size_t shoff = rd(good, 40, 8), symtab = section_of_type(good, 2), info = section_header(good, ".nv.info");
    std::vector<Corruption> cases = {
        {"bad magic", 1, 1, 'X'},
        {"32-bit class", 4, 1, 1},
        {"big-endian", 5, 1, 2},
        {"ET_REL", 16, 2, 1},
        {"not EM_CUDA (x86-64)", 18, 2, 62},
        {"huge e_shoff", 40, 8, 0xffffffffffff0000ull},
        {"e_shoff past the end", 40, 8, good.size()},
        {"65535 sections", 60, 2, 0xffff},
        {"no sections", 60, 2, 0},
        {"bad e_shentsize", 58, 2, 40},
        {"e_shstrndx out of range", 62, 2, rd(good, 60, 2)},
        {"e_flags without an SM", 48, 4, 0},
        {"section 1 offset huge", shoff + 64 + 24, 8, 0x7ffffffffffff000ull},
        {"section 1 size past the end", shoff + 64 + 32, 8, good.size()},
        {"section 2 name out of range", shoff + 128, 4, 0xffffffffu},
        {"huge e_phoff", 32, 8, 0xfffffffffffffff0ull},
    };
    if (symtab) {
        cases.push_back({"symtab string link out of range", symtab + 40, 4, 9999});
        cases.push_back({"symtab entry size", symtab + 56, 8, 16});
    }
    if (info) {
        const size_t rec = rd(good, info + 24, 8);  // first record: {format 0x04, attr, u16 size}
        cases.push_back({".nv.info record size past its section", rec + 2, 2, 0xfff0});
        cases.push_back({".nv.info unknown record format", rec, 1, 0x09});
    }
    for (const Corruption& c : cases) {
        Bytes b = good;
        wr(b, c.off, c.n, c.value);
        expect_reject(b, label + " with " + c.what);
    }
}

// Random byte mutations aimed at the headers and tables: any verdict is fine, a crash or over-read is not.
static void fuzz(const Bytes& good, bool elf, const std::string& label, int rounds) {
    std::mt19937 rng(12345);
    int accepted = 0;
    const size_t shoff = elf ? rd(good, 40, 8) : 0, shnum = elf ? rd(good, 60, 2) : 0;
    for (int r = 0; r < rounds; ++r) {
        Bytes b = good;
        const int flips = 1 + rng() % 6;
        for (int f = 0; f < flips; ++f) {
            size_t pos;
            if (elf && r % 3 == 0) pos = rng() % 64;
            else if (elf && r % 3 == 1) pos = shoff + rng() % (shnum * 64);
            else pos = rng() % (b.size() - (elf ? 0 : 1));  // keep the PTX NUL: a string is all the driver gets
            b[pos] = elf ? uint8_t(rng()) : uint8_t(" .{}();,[]0123456789abcdefxsmu_\n"[rng() % 32]);
        }
        sim::ImageInfo info;
        std::string err;
        accepted += parse_bounded(b, info, err);
        if (!elf) sim::parse_image(b.data(), info, err);  // unbounded too: PTX text must stop at its NUL
    }
    check(true, label + ": " + std::to_string(rounds) + " mutants parsed without a crash (" + std::to_string(accepted) +
                    " accepted)");
}

static void check_runs_on(const std::map<std::string, const sim::ImageInfo*>& by_target) {
    struct Case {
        const char* target;
        int major, minor;
        bool runs;
    };
    static const Case cases[] = {
        {"sm_80", 8, 0, true},   {"sm_80", 8, 6, true},   {"sm_80", 8, 9, true},   {"sm_80", 9, 0, false},
        {"sm_80", 12, 0, false}, {"sm_80", 7, 5, false},  {"sm_86", 8, 9, true},   {"sm_86", 8, 6, true},
        {"sm_86", 8, 0, false},  {"sm_89", 8, 9, true},   {"sm_89", 8, 6, false},  {"sm_89", 9, 0, false},
        {"sm_90a", 9, 0, true},  {"sm_90a", 10, 0, false}, {"sm_90a", 8, 9, false}, {"sm_90a", 12, 0, false},
        {"sm_120", 12, 0, true}, {"sm_120", 12, 1, true}, {"sm_120", 10, 0, false}, {"sm_120", 9, 0, false},
        {"compute_80", 8, 0, true}, {"compute_80", 8, 9, true}, {"compute_80", 9, 0, true},
        {"compute_80", 12, 0, true}, {"compute_80", 7, 5, false},
    };
    for (const Case& c : cases) {
        auto it = by_target.find(c.target);
        if (it == by_target.end()) continue;
        check(sim::image_runs_on(*it->second, c.major, c.minor) == c.runs,
              std::string(c.target) + " image on " + std::to_string(c.major) + "." + std::to_string(c.minor) +
                  (c.runs ? " runs" : " is refused"));
    }
}

// "a" cubins differ from plain ones only in one e_flags bit, checked against NVRTC 12.9's own sm_90a/sm_120a
// output (0x005a0d5a vs 0x005a055a; 0x0600780a vs 0x06007802). Set it on real plain cubins.
static void check_arch_flag_layouts(const std::map<std::string, const Image*>& cubins) {
    struct Case {
        const char* target;
        uint32_t bit;
        int arch;
        int major, minor;
    };
    for (const Case& c : {Case{"sm_89", 0x800, 89, 8, 9}, Case{"sm_120", 0x8, 120, 12, 0}}) {
        auto it = cubins.find(c.target);
        if (it == cubins.end()) continue;
        Bytes b = it->second->bytes;
        wr(b, 48, 4, rd(b, 48, 4) | c.bit);
        sim::ImageInfo info;
        std::string err;
        const std::string label = std::string(c.target) + " with the 'a' e_flags bit";
        check(parse_bounded(b, info, err) && info.arch == c.arch && info.arch_specific,
              label + " reads as arch-specific");
        check(sim::image_runs_on(info, c.major, c.minor) && !sim::image_runs_on(info, c.major, c.minor + 1),
              label + " runs only on exactly its arch");
    }
}

static void check_synthetic_ptx() {
    const std::string ptx = R"(//
// a comment naming .target sm_99 and .entry fake( must be ignored
/* and so must this .shared .b8 x[999]; */
.version 8.8
.target sm_75, debug
.address_size 64

.shared .align 8 .b8 mod_buf[100];
.shared .align 4 .b8 unused_buf[4000];
.extern .shared .align 16 .b8 dyn[];
.global .align 4 .b8 table[8] = {1, 2, 3, 4, 5, 6, 7, 8};
.extern .func (.param .b32 r) helper (.param .b32 a);

.func (.param .b32 r) helper(.param .b32 a)
{
	mov.u64 	%rd1, mod_buf;
	ret;
}

.visible .entry k1(
	.param .u64 k1_param_0
)
.reqntid 32, 4
{
	.shared .align 4 .b8 a[3];
	.shared .align 16 .v4 .f32 b[2];
	.local .align 8 .b8 __local_depot0[40];
	.reg .b32 %r<4>;
	{
	.reg .b32 t;
	call.uni (retval0), helper, (param0);
	}
	ret;
}

.entry k2
.maxntid 64
.pragma "nounroll";
{
	mov.u64 %rd1, dyn;
	ret;
}

.section .debug_str { $L__info_string0: .b8 95, 90, 0 }
)";
    sim::ImageInfo info;
    std::string err;
    const Bytes b = text(ptx);
    const bool ok = sim::parse_image(b.data(), info, err);
    check(ok, "synthetic PTX parses: " + err);
    if (!ok) return;
    check(info.is_ptx && info.arch == 75 && !info.arch_specific && info.size == ptx.size(), "synthetic PTX header");
    check(info.kernels.size() == 2 && info.kernels[0].name == "k1" && info.kernels[1].name == "k2",
          "synthetic PTX entries are k1, k2 (comments and .func skipped)");
    if (info.kernels.size() != 2) return;
    const auto &k1 = info.kernels[0], &k2 = info.kernels[1];
    // a: 0..3, b: aligned to 16 -> 16..48, mod_buf (reached through helper): aligned to 8 -> 48..148
    check(k1.static_smem == 148, "k1 static_smem " + std::to_string(k1.static_smem) + " == 148");
    check(k1.max_threads == 128 && k1.local_bytes == 40 && k1.regs == -1, "k1 reqntid 32x4 and 40 local bytes");
    check(k2.static_smem == 0 && k2.max_threads == 64, "k2: only dynamic smem, maxntid 64");

    for (const auto& [target, arch, a, f] : {std::tuple<const char*, int, bool, bool>{"sm_90a", 90, true, false},
                                             {"sm_120f", 120, false, true},
                                             {"sm_100", 100, false, false}}) {
        const Bytes t = text(std::string(".version 8.8\n.target ") + target + "\n.address_size 64\n");
        const bool ok = parse_bounded(t, info, err);
        check(ok && info.arch == arch && info.arch_specific == a && info.family_specific == f && info.kernels.empty(),
              std::string("PTX .target ") + target);
    }
    const Bytes pa = text(".version 8.8\n.target sm_90a\n"), pf = text(".version 8.8\n.target sm_120f\n");
    parse_bounded(pa, info, err);
    check(sim::image_runs_on(info, 9, 0) && !sim::image_runs_on(info, 10, 0) && !sim::image_runs_on(info, 12, 0),
          "sm_90a PTX JITs only on 9.0");
    parse_bounded(pf, info, err);
    check(sim::image_runs_on(info, 12, 0) && sim::image_runs_on(info, 12, 1) && !sim::image_runs_on(info, 13, 0) &&
              !sim::image_runs_on(info, 10, 0),
          "sm_120f PTX JITs only on 12.x");

    expect_reject(text(".version 8.8\n.address_size 64\n.visible .entry k() { ret; }\n"), "PTX without .target");
    expect_reject(text(".version 8.8\n.target compute_80\n"), "PTX .target compute_80");
    expect_reject(text(".version 8.8\n.target sm_80\n.visible .entry k(.param .u64 p)\n{\n\tret;\n"),
                  "PTX with an unterminated entry");
    expect_reject(text(".version 8.8\n.target sm_80\n.entry k() { .shared .foo x[4]; }\n"),
                  "PTX with a bad .shared type");
    expect_reject(text(""), "empty string");
    expect_reject(Bytes(), "zero-length image");
    expect_reject(Bytes(100, 0), "all-zero bytes");
    expect_reject(Bytes{'.', 'v', 'e', 'r'}, "PTX without a NUL inside the image");
    expect_reject(Bytes{0x50, 0xed, 0x55, 0xba, 1, 0, 0x10, 0}, "fatbin header");
    std::string err2;
    check(!sim::parse_image(nullptr, info, err2) && !err2.empty(), "null image is rejected");
}

static void check_garbage() {
    std::mt19937 rng(7);
    for (int round = 0; round < 200; ++round) {
        Bytes b(1 + rng() % 4096);
        for (auto& c : b) c = uint8_t(rng());
        if (round % 2) memcpy(b.data(), "\x7f" "ELF", std::min<size_t>(4, b.size()));  // half of them pretend to be ELF
        sim::ImageInfo info;
        std::string err;
        if (parse_bounded(b, info, err)) {
            check(false, "random garbage round " + std::to_string(round) + " was accepted");
            return;
        }
    }
    check(true, "200 random garbage buffers are rejected");
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT_DIR [KERNELS_DIR]\n", argv[0]);
        return 2;
    }
    const fs::path out_dir = argv[1], kernels_dir = argc > 2 ? argv[2] : "kernels";
    std::vector<Image> images;

    for (const auto& entry : fs::directory_iterator(out_dir)) {
        // <module>.<sm_XX[a]|compute_XX>.<cubin|ptx>
        const std::string file = entry.path().filename().string();
        const size_t dot1 = file.find('.'), dot2 = file.find('.', dot1 + 1);
        if (dot1 == std::string::npos || dot2 == std::string::npos) continue;
        const std::string module = file.substr(0, dot1), target = file.substr(dot1 + 1, dot2 - dot1 - 1),
                          ext = file.substr(dot2 + 1);
        const bool known_target = target.rfind("sm_", 0) == 0 || target.rfind("compute_", 0) == 0;
        if (!known_target || (ext != "cubin" && ext != "ptx")) continue;
        images.push_back({module, target, file, read_file(entry.path()), {}});
    }
    std::sort(images.begin(), images.end(), [](const Image& a, const Image& b) { return a.file < b.file; });
    check(images.size() >= 30, "found the 5 modules x 6 targets in " + out_dir.string() + " (" +
                                   std::to_string(images.size()) + " images)");

    std::map<std::string, std::map<std::string, long>> sources;
    std::map<std::string, const sim::ImageInfo*> sm_by_target;  // one module's images, for the runs_on rules
    std::map<std::string, const Image*> cubin_by_target;
    std::map<std::string, std::map<std::string, uint32_t>> ptx_smem;  // module -> kernel -> PTX static smem
    std::map<std::string, std::map<std::string, uint32_t>> sm80_smem;  // module -> kernel -> sm_80 cubin static smem
    std::map<std::string, std::map<std::string, std::map<int, uint32_t>>> newer_smem;  // sm_89+ cubins, by arch
    for (Image& im : images) {
        if (!sources.count(im.module)) {
            sources[im.module] = source_kernels(kernels_dir / (im.module + ".cu"));
            check(!sources[im.module].empty(), "found kernels in " + (kernels_dir / (im.module + ".cu")).string());
        }
        check_real_image(im, sources[im.module], im.file);
        size_t smem_total = 0;
        for (const auto& k : im.info.kernels) smem_total += k.static_smem;
        printf("%-28s arch %3d%s  %zu kernels  %7zu bytes  static smem total %zu\n", im.file.c_str(), im.info.arch,
               im.info.arch_specific ? "a" : " ", im.info.kernels.size(), im.info.size, smem_total);
        if (im.module == "gemm") {
            sm_by_target[im.target] = &im.info;
            if (!im.info.is_ptx) cubin_by_target[im.target] = &im;
        }
        if (im.info.is_ptx)
            for (const auto& k : im.info.kernels) ptx_smem[im.module][k.name] = k.static_smem;
        if (!im.info.is_ptx && im.info.arch == 80)
            for (const auto& k : im.info.kernels) sm80_smem[im.module][k.name] = k.static_smem;
        // Not the arch-specific images (sm_90a): they also compile the __CUDA_ARCH_FEAT_SM90_ALL branches
        // (the Hopper kernels, traps elsewhere). The PTX rule below still checks their other kernels.
        if (!im.info.is_ptx && im.info.arch >= 89 && !im.info.arch_specific)
            for (const auto& k : im.info.kernels) newer_smem[im.module][k.name][im.info.arch] = k.static_smem;
    }
    // The sm_89+ cubins (but sm_90a's, above) compile the same source branches: their sizes must agree
    // across ELF ABIs.
    for (const auto& [module, kernels] : newer_smem)
        for (const auto& [name, by_arch] : kernels)
            for (const auto& [arch, smem] : by_arch)
                check(smem == by_arch.begin()->second, module + " " + name + " static smem on sm_" + std::to_string(arch) +
                                                           " == sm_" + std::to_string(by_arch.begin()->first));
    // Every cubin's static smem (sm_90+ prefix removed) must equal what its PTX declares (rounded up to
    // 16 bytes). The PTX is
    // compute_80: kernels with arch-guarded bodies (__CUDA_ARCH__ >= 890 ...) legitimately differ on
    // newer targets, so where the sm_80 cubin agrees with the PTX, a newer cubin may differ only if
    // the sm_80 one also differs from it.
    for (const Image& im : images) {
        if (im.info.is_ptx) continue;
        for (const auto& k : im.info.kernels) {
            auto p = ptx_smem[im.module].find(k.name);
            bool same_source_branch = im.info.arch == 80 || sm80_smem[im.module][k.name] == k.static_smem;
            // ptxas reserves static shared memory in 16-byte units (one 4-byte word takes 16).
            const uint32_t reserved = p == ptx_smem[im.module].end() ? 0 : (p->second + 15) / 16 * 16;
            if (p != ptx_smem[im.module].end() && same_source_branch)
                check(k.static_smem == reserved, im.file + " " + k.name + " static_smem " +
                                                     std::to_string(k.static_smem) + " == PTX " +
                                                     std::to_string(p->second) + " in 16-byte units");
        }
    }

    for (const Image& im : images) {
        if (im.info.is_ptx || im.bytes.size() < 128) continue;
        check_truncation(im, im.file);
        check_corruptions(im, im.file);
    }
    for (const Image& im : images) {
        if (im.file == "norm.sm_89.cubin" || im.file == "norm.sm_120.cubin") fuzz(im.bytes, true, im.file, 3000);
        if (im.file == "norm.compute_80.ptx") {
            fuzz(im.bytes, false, im.file, 300);
            const size_t entry = std::string(im.bytes.begin(), im.bytes.end()).rfind(".entry");
            Bytes cut(im.bytes.begin(), im.bytes.begin() + entry + 200);
            expect_reject(cut, im.file + " cut inside an entry, without a NUL");
            cut.push_back(0);
            expect_reject(cut, im.file + " cut inside an entry");
        }
    }
    check_runs_on(sm_by_target);
    check_arch_flag_layouts(cubin_by_target);
    check_synthetic_ptx();
    check_garbage();

    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
