// Module image parsing: cubin (ELF64, EM_CUDA) and PTX text. Layouts were checked against NVRTC 12.9 output
// for sm_50..sm_121 (see image.h for what each field means).
#include "image.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string_view>

namespace sim {
namespace {

using std::string_view;

bool fail(std::string& error, std::string reason) {
    error = std::move(reason);
    return false;
}

std::string hex(uint64_t v) {
    char buf[24];
    snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
    return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Cubin

constexpr uint16_t kEmCuda = 190;
constexpr uint16_t kEtExec = 2;
constexpr uint32_t kShtSymtab = 2, kShtStrtab = 3, kShtNobits = 8;
constexpr uint32_t kShtCudaInfo = 0x70000000;  // SHT_LOPROC: .nv.info and .nv.info.<kernel>
constexpr uint8_t kSttFunc = 2;
constexpr uint8_t kStoCudaEntry = 0x10;  // st_other bit ptxas sets on __global__ entry points (not on helpers)
// EIATTR_* ids read from .nv.info sections.
constexpr uint8_t kAttrMaxThreads = 0x05, kAttrReqNtid = 0x10, kAttrFrameSize = 0x11, kAttrRegCount = 0x2f;
// Real cubins are at most tens of MB; headers claiming more are garbage we must not chase through memory.
constexpr uint64_t kMaxImageBytes = 1ull << 32;
// From sm_90 ptxas puts a kernel's static __shared__ after 1 KiB reserved for the system, and the
// .nv.shared.<name> size counts it; the driver reports the static size without it. sm_100+ cubins also
// state the amount as the value of this symbol.
constexpr uint32_t kSm90SharedPrefix = 1024;
constexpr string_view kReservedSmemSymbol = ".nv.reservedSmem.cap";

// Little-endian reads from an image whose known length is `avail` (SIZE_MAX when the caller has no length).
struct Bytes {
    const uint8_t* p;
    uint64_t avail;
    bool has(uint64_t off, uint64_t len) const { return off <= avail && len <= avail - off; }
    uint64_t le(uint64_t off, int n) const {
        uint64_t v = 0;
        for (int i = n - 1; i >= 0; --i) v = v << 8 | p[off + i];
        return v;
    }
    uint16_t u16(uint64_t off) const { return static_cast<uint16_t>(le(off, 2)); }
    uint32_t u32(uint64_t off) const { return static_cast<uint32_t>(le(off, 4)); }
    uint64_t u64(uint64_t off) const { return le(off, 8); }
};

struct Section {
    uint32_t name = 0, type = 0, link = 0, info = 0;
    uint64_t offset = 0, size = 0, entsize = 0;
    string_view label;
};

// NUL-terminated string at `off` inside the string table `s`; false if it would run off the section.
bool str_at(const Bytes& b, const Section& s, uint64_t off, string_view& out) {
    if (s.type == kShtNobits || off >= s.size) return false;
    const char* begin = reinterpret_cast<const char*>(b.p + s.offset + off);
    const void* nul = memchr(begin, 0, s.size - off);
    if (!nul) return false;
    out = string_view(begin, static_cast<const char*>(nul) - begin);
    return true;
}

// Walks the EIATTR records of one .nv.info section: a 4-byte header {u8 format, u8 attribute, u16 value}, where
// format 0x04 (EIFMT_SVAL) makes the u16 a payload size and the payload follows; formats 0x01-0x03 have none.
template <class Fn>
bool for_each_attr(const Bytes& b, const Section& s, std::string& error, Fn&& fn) {
    uint64_t pos = s.offset;
    const uint64_t end = s.offset + s.size;
    while (pos < end) {
        if (end - pos < 4) return fail(error, "truncated record in " + std::string(s.label));
        const uint8_t format = b.p[pos], attr = b.p[pos + 1];
        const uint16_t value = b.u16(pos + 2);
        if (format < 0x01 || format > 0x04)
            return fail(error, "unknown record format " + hex(format) + " in " + std::string(s.label));
        const uint64_t payload = format == 0x04 ? value : 0;
        if (payload > end - pos - 4) return fail(error, "record runs past the end of " + std::string(s.label));
        fn(attr, pos + 4, payload);
        pos += 4 + payload;
    }
    return true;
}

// x*y*z of a 3 x u32 block-shape payload (fewer dimensions count as 1); false if it can't be a block size.
bool block_product(const Bytes& b, uint64_t at, uint64_t len, uint32_t& out) {
    uint64_t product = 1;
    for (uint64_t i = 0; i < 3 && 4 * (i + 1) <= len; ++i) product *= b.u32(at + 4 * i);
    if (product > UINT32_MAX) return false;
    out = static_cast<uint32_t>(product);
    return true;
}

bool parse_elf(const Bytes& b, ImageInfo& out, std::string& error) {
    if (!b.has(0, 64)) return fail(error, "truncated ELF header");
    if (memcmp(b.p, "\x7f" "ELF", 4) != 0) return fail(error, "bad ELF magic");
    if (b.p[4] != 2) return fail(error, "not a 64-bit ELF (EI_CLASS " + std::to_string(b.p[4]) + ")");
    if (b.p[5] != 1) return fail(error, "not a little-endian ELF");
    const uint16_t machine = b.u16(18), type = b.u16(16);
    if (machine != kEmCuda) return fail(error, "not a CUDA ELF (e_machine " + std::to_string(machine) + ", want 190)");
    if (type != kEtExec)
        return fail(error, "ELF type " + std::to_string(type) + " is not an executable cubin (objects need cuLink)");
    const uint64_t phoff = b.u64(32), shoff = b.u64(40);
    const uint32_t flags = b.u32(48);
    const uint16_t phentsize = b.u16(54), phnum = b.u16(56), shentsize = b.u16(58), shnum = b.u16(60),
                   shstrndx = b.u16(62);
    if (shnum == 0) return fail(error, "no section table");
    if (shentsize != 64) return fail(error, "bad e_shentsize " + std::to_string(shentsize));
    if (phnum != 0 && phentsize != 56) return fail(error, "bad e_phentsize " + std::to_string(phentsize));
    if (shstrndx >= shnum) return fail(error, "e_shstrndx out of range");

    // The image ends where the last header table or section/segment contents end.
    uint64_t end = 64;
    auto extend = [&](uint64_t off, uint64_t len, const std::string& what) {
        if (off > kMaxImageBytes || len > kMaxImageBytes - off) return fail(error, what + " out of range");
        if (!b.has(off, len)) return fail(error, what + " runs past the end of the image (truncated?)");
        end = std::max(end, off + len);
        return true;
    };
    if (!extend(shoff, uint64_t(shnum) * 64, "section header table")) return false;
    if (!extend(phoff, uint64_t(phnum) * 56, "program header table")) return false;

    std::vector<Section> secs(shnum);
    for (uint16_t i = 0; i < shnum; ++i) {
        const uint64_t h = shoff + uint64_t(i) * 64;
        Section& s = secs[i];
        s.name = b.u32(h);
        s.type = b.u32(h + 4);
        s.offset = b.u64(h + 24);
        s.size = b.u64(h + 32);
        s.link = b.u32(h + 40);
        s.info = b.u32(h + 44);
        s.entsize = b.u64(h + 56);
        if (i != 0 && s.type != kShtNobits && !extend(s.offset, s.size, "section " + std::to_string(i))) return false;
    }
    for (uint16_t i = 0; i < phnum; ++i) {
        const uint64_t h = phoff + uint64_t(i) * 56;
        if (!extend(b.u64(h + 8), b.u64(h + 32), "segment " + std::to_string(i))) return false;
    }
    out.size = end;

    // e_flags has two layouts, chosen by EI_ABIVERSION. ABI 7 (CUDA 12.x up to sm_90): SM in bits 0-7,
    // 0x800 = "a" target, virtual SM in bits 16-23. ABI 8 (sm_100+): SM in bits 8-15, 0x8 = "a" target.
    out.elf_abi_version = b.p[8];
    if (out.elf_abi_version >= 8) {
        out.arch = (flags >> 8) & 0xff;
        out.arch_specific = (flags & 0x8) != 0;
    } else {
        out.arch = flags & 0xff;
        out.arch_specific = (flags & 0x800) != 0;
    }
    if (out.arch < 10) return fail(error, "e_flags " + hex(flags) + " name no SM version");

    const Section& shstr = secs[shstrndx];
    if (shstr.type != kShtStrtab) return fail(error, "section name table is not a string table");
    for (uint16_t i = 1; i < shnum; ++i)
        if (!str_at(b, shstr, secs[i].name, secs[i].label))
            return fail(error, "section " + std::to_string(i) + " name out of range");

    // Per-kernel facts live in sections named after the kernel; the global .nv.info is keyed by symbol index.
    std::map<string_view, const Section*> shared, info;
    const Section* global_info = nullptr;
    const Section* symtab = nullptr;
    for (const Section& s : secs) {
        if (s.label.rfind(".nv.shared.", 0) == 0) shared[s.label.substr(11)] = &s;
        if (s.type == kShtCudaInfo && s.label == ".nv.info") global_info = &s;
        if (s.type == kShtCudaInfo && s.label.rfind(".nv.info.", 0) == 0) info[s.label.substr(9)] = &s;
        if (s.type == kShtSymtab && !symtab) symtab = &s;
    }
    if (!symtab) return true;  // no symbols, no kernels
    if (symtab->entsize != 24 || symtab->size % 24 != 0) return fail(error, "bad .symtab entry size");
    if (symtab->link >= shnum || secs[symtab->link].type != kShtStrtab)
        return fail(error, ".symtab string table link out of range");
    const Section& strtab = secs[symtab->link];

    std::map<uint32_t, uint32_t> regcount, frame_size;  // by symbol index
    if (global_info) {
        bool ok = for_each_attr(b, *global_info, error, [&](uint8_t attr, uint64_t at, uint64_t len) {
            if ((attr == kAttrRegCount || attr == kAttrFrameSize) && len >= 8)
                (attr == kAttrRegCount ? regcount : frame_size)[b.u32(at)] = b.u32(at + 4);
        });
        if (!ok) return false;
    }

    uint32_t shared_prefix = out.arch >= 90 ? kSm90SharedPrefix : 0;
    struct Entry {
        string_view name;
        uint32_t sym;
        uint16_t shndx;
    };
    std::vector<Entry> entries;
    for (uint64_t j = 0; j < symtab->size / 24; ++j) {
        const uint64_t e = symtab->offset + j * 24;
        string_view name;
        if (!str_at(b, strtab, b.u32(e), name))
            return fail(error, "symbol " + std::to_string(j) + " name out of range");
        const uint8_t st_info = b.p[e + 4], st_other = b.p[e + 5];
        if (name == kReservedSmemSymbol && b.u64(e + 8) <= UINT32_MAX) shared_prefix = uint32_t(b.u64(e + 8));
        if ((st_info & 0xf) == kSttFunc && (st_other & kStoCudaEntry))
            entries.push_back({name, static_cast<uint32_t>(j), b.u16(e + 6)});
    }

    for (const Entry& en : entries) {
        KernelImageInfo k;
        k.name = std::string(en.name);
        if (auto it = shared.find(en.name); it != shared.end()) {
            if (it->second->size > UINT32_MAX) return fail(error, "implausible shared size for " + k.name);
            k.shared_section = static_cast<uint32_t>(it->second->size);
            // A section smaller than the prefix evidently doesn't contain it.
            k.static_smem = k.shared_section >= shared_prefix ? k.shared_section - shared_prefix : k.shared_section;
        }
        if (auto it = regcount.find(en.sym); it != regcount.end()) {
            k.regs = static_cast<int>(std::min<uint32_t>(it->second, 65535));
        } else if (out.elf_abi_version < 8 && en.shndx < shnum && (secs[en.shndx].info >> 24) != 0) {
            k.regs = static_cast<int>(secs[en.shndx].info >> 24);  // ABI 7 also keeps it in .text sh_info
        }
        if (auto it = frame_size.find(en.sym); it != frame_size.end()) k.local_bytes = it->second;
        if (auto it = info.find(en.name); it != info.end()) {
            uint32_t max_threads = 0, req_threads = 0;
            bool bad_shape = false;
            bool ok = for_each_attr(b, *it->second, error, [&](uint8_t attr, uint64_t at, uint64_t len) {
                if (attr == kAttrMaxThreads) bad_shape |= !block_product(b, at, len, max_threads);
                if (attr == kAttrReqNtid) bad_shape |= !block_product(b, at, len, req_threads);
            });
            if (!ok) return false;
            if (bad_shape) return fail(error, "implausible block shape for " + k.name);
            // .reqntid fixes the block size, so it bounds it too; keep the tighter of the two.
            k.max_threads = max_threads && req_threads ? std::min(max_threads, req_threads) : max_threads | req_threads;
        }
        out.kernels.push_back(std::move(k));
    }
    return true;
}

// ---------------------------------------------------------------------------------------------------------------
// PTX

// Length of the NUL-terminated text at p, reading nothing past the NUL or `avail`. A control byte no PTX file
// contains ends the scan early, so garbage is rejected after a few bytes instead of being read to a NUL.
bool text_length(const Bytes& b, uint64_t& len, std::string& error) {
    for (uint64_t i = 0;; ++i) {
        if (!b.has(i, 1)) return fail(error, "PTX text is not NUL-terminated within the image");
        const uint8_t c = b.p[i];
        if (c == 0) {
            len = i;
            return true;
        }
        if (c < 0x20 && c != '\t' && c != '\n' && c != '\r' && c != '\v' && c != '\f')
            return fail(error, "not a cubin or PTX text (byte " + hex(c) + " at offset " + std::to_string(i) + ")");
    }
}

// Splits PTX into tokens: words (directives, identifiers, numbers, dotted opcodes such as ld.shared.f32),
// string literals, and single punctuation characters. Comments are skipped.
class PtxLexer {
public:
    explicit PtxLexer(string_view s) : s_(s) {}
    string_view next() {  // empty at the end
        skip_space_and_comments();
        if (i_ >= s_.size()) return {};
        const size_t start = i_;
        if (is_word(s_[i_])) {
            while (i_ < s_.size() && is_word(s_[i_])) ++i_;
        } else if (s_[i_] == '"') {
            for (++i_; i_ < s_.size() && s_[i_] != '"'; ++i_)
                if (s_[i_] == '\\') ++i_;
            i_ = std::min(i_ + 1, s_.size());
        } else {
            ++i_;
        }
        return s_.substr(start, i_ - start);
    }

private:
    static bool is_word(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '$' ||
               c == '%' || c == '.';
    }
    void skip_space_and_comments() {
        while (i_ < s_.size()) {
            const char c = s_[i_];
            if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') {
                ++i_;
            } else if (s_.compare(i_, 2, "//") == 0) {
                const size_t eol = s_.find('\n', i_);
                i_ = eol == string_view::npos ? s_.size() : eol + 1;
            } else if (s_.compare(i_, 2, "/*") == 0) {
                const size_t close = s_.find("*/", i_ + 2);
                i_ = close == string_view::npos ? s_.size() : close + 2;
            } else {
                return;
            }
        }
    }
    string_view s_;
    size_t i_ = 0;
};

// Decimal or 0x-hex; false for anything else or values too large to be a size.
bool ptx_number(string_view t, uint64_t& out) {
    int base = 10;
    if (t.size() > 2 && t[0] == '0' && (t[1] == 'x' || t[1] == 'X')) {
        base = 16;
        t.remove_prefix(2);
    }
    if (t.empty()) return false;
    uint64_t v = 0;
    for (char c : t) {
        const int d = c >= '0' && c <= '9'   ? c - '0'
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                             : 99;
        if (d >= base) return false;
        v = v * base + d;
        if (v > kMaxImageBytes) return false;
    }
    out = v;
    return true;
}

uint64_t ptx_type_bytes(string_view t) {
    static const std::map<string_view, uint64_t> sizes = {
        {".pred", 1}, {".b8", 1},  {".u8", 1},  {".s8", 1},  {".b16", 2},    {".u16", 2},    {".s16", 2},
        {".f16", 2},  {".bf16", 2}, {".b32", 4}, {".u32", 4}, {".s32", 4},    {".f32", 4},    {".f16x2", 4},
        {".bf16x2", 4}, {".b64", 8}, {".u64", 8}, {".s64", 8}, {".f64", 8},    {".b128", 16}};
    auto it = sizes.find(t);
    return it == sizes.end() ? 0 : it->second;
}

struct PtxVar {
    std::string name;
    uint64_t size = 0, align = 1;
};

// Adds variables in declaration order, each aligned as declared; returns the running end offset.
uint64_t layout(uint64_t offset, const PtxVar& v) {
    offset = (offset + v.align - 1) / v.align * v.align;
    return offset + v.size;
}

struct PtxFunc {
    bool entry = false;
    std::vector<PtxVar> shared;
    uint64_t local_bytes = 0;
    uint32_t maxntid = 0, reqntid = 0;
    std::set<std::string, std::less<>> refs;  // identifiers the body names: module .shared vars, callees
};

class PtxParser {
public:
    PtxParser(string_view text, ImageInfo& out, std::string& error) : lex_(text), out_(out), error_(error) {}

    bool parse() {
        std::map<std::string, PtxFunc, std::less<>> funcs;
        std::vector<std::string> entry_order;
        std::map<std::string, size_t, std::less<>> module_shared;  // name -> index in module_vars
        std::vector<PtxVar> module_vars;
        bool have_target = false;
        string_view prev;
        for (string_view t = lex_.next(); !t.empty(); prev = t, t = lex_.next()) {
            if (t == ".target" && !have_target) {
                if (!parse_target()) return false;
                have_target = true;
            } else if (t == ".entry" || t == ".func") {
                std::string name;
                PtxFunc f;
                f.entry = t == ".entry";
                bool defined = false;
                if (!parse_function(f, name, defined)) return false;
                if (!defined) continue;  // prototype only
                if (f.entry) entry_order.push_back(name);
                funcs[name] = std::move(f);
            } else if (t == ".shared" && prev != ".extern") {  // .extern .shared is dynamic: no static bytes
                std::vector<PtxVar> vars;
                if (!parse_decl(vars)) return false;
                for (PtxVar& v : vars) {
                    module_shared[v.name] = module_vars.size();
                    module_vars.push_back(std::move(v));
                }
            } else if (t == ".shared" || t == ".global" || t == ".const" || t == ".local") {
                if (!skip_statement()) return false;  // initializers may hold braces
            } else if (t == ".section" || t == "{") {
                if (!skip_block(t == "{")) return false;  // DWARF .section bodies hold no kernels
            }
        }
        if (!have_target) return fail(error_, "PTX without .target");

        for (const std::string& name : entry_order) {
            const PtxFunc& f = funcs[name];
            KernelImageInfo k;
            k.name = name;
            k.max_threads = f.maxntid && f.reqntid ? std::min(f.maxntid, f.reqntid) : f.maxntid | f.reqntid;
            // Module-scope .shared counts for every entry that reaches it, directly or through callees.
            std::set<size_t> used;
            std::set<string_view> seen;
            std::vector<const PtxFunc*> todo = {&f};
            std::vector<PtxVar> vars = f.shared;
            while (!todo.empty()) {
                const PtxFunc* g = todo.back();
                todo.pop_back();
                for (const std::string& r : g->refs) {
                    if (auto v = module_shared.find(r); v != module_shared.end()) used.insert(v->second);
                    auto callee = funcs.find(r);
                    if (callee != funcs.end() && !callee->second.entry && seen.insert(callee->first).second) {
                        todo.push_back(&callee->second);
                        vars.insert(vars.end(), callee->second.shared.begin(), callee->second.shared.end());
                    }
                }
            }
            for (size_t i : used) vars.push_back(module_vars[i]);
            uint64_t smem = 0;
            for (const PtxVar& v : vars) smem = layout(smem, v);
            if (smem > UINT32_MAX || f.local_bytes > UINT32_MAX)
                return fail(error_, "implausible memory size in " + name);
            k.static_smem = static_cast<uint32_t>(smem);
            k.local_bytes = static_cast<uint32_t>(f.local_bytes);
            out_.kernels.push_back(std::move(k));
        }
        return true;
    }

private:
    // ".target sm_90a[, texmode_independent, debug ...]"
    bool parse_target() {
        for (;;) {
            const string_view t = lex_.next();
            if (t.empty()) return fail(error_, "truncated .target directive");
            if (t.rfind("sm_", 0) == 0 && out_.arch == 0) {
                size_t i = 3;
                int arch = 0;
                while (i < t.size() && t[i] >= '0' && t[i] <= '9' && arch < 10000) arch = arch * 10 + (t[i++] - '0');
                const string_view suffix = t.substr(i);
                if (arch < 10 || !(suffix.empty() || suffix == "a" || suffix == "f"))
                    return fail(error_, "bad .target " + std::string(t));
                out_.arch = arch;
                out_.arch_specific = suffix == "a";
                out_.family_specific = suffix == "f";
            }
            const string_view sep = peek();
            if (sep != ",") break;
            lex_.next();
        }
        if (out_.arch == 0) return fail(error_, ".target names no sm_XX");
        return true;
    }

    // After ".entry"/".func": optional return list, name, parameter list, performance directives, then either
    // ";" (a prototype) or the body.
    bool parse_function(PtxFunc& f, std::string& name, bool& defined) {
        string_view t = lex_.next();
        if (t == "(") {
            if (!skip_parens()) return false;
            t = lex_.next();
        }
        if (t.empty() || !is_identifier(t)) return fail(error_, "missing function name after .entry/.func");
        name = std::string(t);
        for (t = lex_.next();; t = lex_.next()) {
            if (t.empty()) return fail(error_, "truncated PTX in the header of " + name);
            if (t == "(") {
                if (!skip_parens()) return false;
            } else if (t == ".maxntid" || t == ".reqntid") {
                uint32_t& dst = t == ".maxntid" ? f.maxntid : f.reqntid;
                if (!parse_shape(dst)) return false;
            } else if (t == ".pragma") {
                if (!skip_statement()) return false;
            } else if (t == ";") {
                defined = false;
                return true;
            } else if (t == "{") {
                defined = true;
                return parse_body(f, name);
            }
        }
    }

    bool parse_body(PtxFunc& f, const std::string& name) {
        int depth = 1;
        uint64_t local_end = 0;
        string_view prev;
        for (string_view t = lex_.next();; prev = t, t = lex_.next()) {
            if (t.empty()) return fail(error_, "truncated PTX in the body of " + name);
            if (t == "{") {
                ++depth;
            } else if (t == "}") {
                if (--depth == 0) break;
            } else if ((t == ".shared" || t == ".local") && prev != ".extern") {
                std::vector<PtxVar> vars;
                if (!parse_decl(vars)) return false;
                for (PtxVar& v : vars) {
                    if (t == ".local") local_end = layout(local_end, v);
                    else f.shared.push_back(std::move(v));
                }
            } else if (is_identifier(t)) {
                f.refs.emplace(t);
            }
        }
        f.local_bytes = local_end;
        return true;
    }

    // After a state space: "[.align N] [.vN] .type name[dims] [, name[dims]] ;".
    bool parse_decl(std::vector<PtxVar>& vars) {
        uint64_t align = 0, elem = 0, vec = 1;
        for (;;) {
            string_view t = lex_.next();
            if (t.empty() || t == "{" || t == "}") return fail(error_, "truncated variable declaration");
            if (t == ".align") {
                if (!ptx_number(lex_.next(), align) || align == 0 || (align & (align - 1)))
                    return fail(error_, "bad .align in a variable declaration");
            } else if (t == ".v2" || t == ".v4" || t == ".v8") {
                vec = t[2] - '0';
            } else if (t[0] == '.') {
                elem = ptx_type_bytes(t);
                if (elem == 0) return fail(error_, "unsupported variable type " + std::string(t));
            } else if (is_identifier(t)) {
                if (elem == 0) return fail(error_, "variable " + std::string(t) + " declared without a type");
                PtxVar v;
                v.name = std::string(t);
                v.size = elem * vec;
                v.align = align ? align : elem * vec;
                for (t = lex_.next(); t == "["; t = lex_.next()) {
                    uint64_t n = 0;
                    t = lex_.next();
                    if (t == "]") {
                        n = 0;  // unsized array: no static bytes
                    } else if (!ptx_number(t, n) || lex_.next() != "]") {
                        return fail(error_, "bad array size for " + v.name);
                    }
                    if (n != 0 && v.size > kMaxImageBytes / n) return fail(error_, "implausible size for " + v.name);
                    v.size *= n;
                }
                vars.push_back(std::move(v));
                if (t == "=") {
                    if (!skip_statement()) return false;
                    return true;
                }
                if (t == ";") return true;
                if (t != ",") return fail(error_, "unexpected '" + std::string(t) + "' in a variable declaration");
            } else {
                return fail(error_, "unexpected '" + std::string(t) + "' in a variable declaration");
            }
        }
    }

    // "x[, y[, z]]" -> x*y*z
    bool parse_shape(uint32_t& out) {
        uint64_t product = 1;
        for (int dim = 0; dim < 3; ++dim) {
            uint64_t n = 0;
            if (!ptx_number(lex_.next(), n)) return fail(error_, "bad .maxntid/.reqntid value");
            product *= n;
            if (product > UINT32_MAX) return fail(error_, "implausible .maxntid/.reqntid");
            if (peek() != ",") break;
            lex_.next();
        }
        out = static_cast<uint32_t>(product);
        return true;
    }

    bool skip_parens() {
        for (int depth = 1; depth > 0;) {
            const string_view t = lex_.next();
            if (t.empty()) return fail(error_, "unbalanced parentheses in PTX");
            depth += t == "(" ? 1 : t == ")" ? -1 : 0;
        }
        return true;
    }

    bool skip_statement() {
        for (string_view t = lex_.next(); t != ";"; t = lex_.next())
            if (t.empty()) return fail(error_, "truncated PTX statement");
        return true;
    }

    // Skips a brace block; `opened` says the "{" was already read.
    bool skip_block(bool opened) {
        int depth = opened ? 1 : 0;
        for (;;) {
            const string_view t = lex_.next();
            if (t.empty()) return fail(error_, "unbalanced braces in PTX");
            if (t == "{") ++depth;
            if (t == "}" && --depth == 0) return true;
        }
    }

    string_view peek() {
        PtxLexer copy = lex_;
        return copy.next();
    }

    // A PTX identifier (letters, digits, _, $, led by a letter, _, $ or %); words with dots are directives,
    // opcodes or numbers.
    static bool is_identifier(string_view t) {
        if (t.empty() || t.find('.') != string_view::npos) return false;
        const char c = t[0];
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '$' || c == '%';
    }

    PtxLexer lex_;
    ImageInfo& out_;
    std::string& error_;
};

// Picks the format from the first bytes: ELF magic, a fatbinary magic (unsupported), else PTX text.
bool parse_any(const Bytes& b, ImageInfo& out, std::string& error) {
    if (!b.has(0, 1)) return fail(error, "empty image");
    if (b.p[0] == 0x7f) return parse_elf(b, out, error);
    // Byte by byte, so a short NUL-terminated PTX string is never read past its NUL (no magic byte is 0).
    auto starts_with = [&](const uint8_t(&magic)[4]) {
        for (uint64_t i = 0; i < 4; ++i)
            if (!b.has(i, 1) || b.p[i] != magic[i]) return false;
        return true;
    };
    static const uint8_t kFatbin[4] = {0x50, 0xed, 0x55, 0xba}, kFatbinWrapper[4] = {0xb1, 0x43, 0x62, 0x46};
    if (starts_with(kFatbin) || starts_with(kFatbinWrapper)) return fail(error, "fatbinary images are not supported");

    uint64_t len = 0;
    if (!text_length(b, len, error)) return false;
    out.is_ptx = true;
    out.size = len;
    return PtxParser(string_view(reinterpret_cast<const char*>(b.p), len), out, error).parse();
}

}  // namespace

bool parse_image_bounded(const void* data, size_t avail, ImageInfo& out, std::string& error) {
    error.clear();
    if (!data) return fail(error, "null image");
    ImageInfo parsed;  // `out` is only replaced by a complete result
    if (!parse_any(Bytes{static_cast<const uint8_t*>(data), avail}, parsed, error)) return false;
    out = std::move(parsed);
    return true;
}

bool parse_image(const void* data, ImageInfo& out, std::string& error) {
    return parse_image_bounded(data, SIZE_MAX, out, error);
}

bool image_runs_on(const ImageInfo& img, int major, int minor) {
    if (major <= 0 || minor < 0 || minor > 9 || img.arch <= 0) return false;
    const int device = major * 10 + minor;
    if (img.arch_specific) return device == img.arch;
    if (img.is_ptx && !img.family_specific) return device >= img.arch;
    return major == img.arch / 10 && minor >= img.arch % 10;
}

}  // namespace sim
