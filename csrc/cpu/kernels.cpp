// Which chunk-loop set the CPU engine runs (cpu/kernels.h): chosen once, at first use.

#include "cpu/kernels.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace fusedclip {
namespace cpu {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

struct Named {
  const char* name;
  const CpuKernels* (*kernels)();  // null result: not in this build
  bool (*runs)();                   // whether this CPU runs it
};

bool always() { return true; }
const CpuKernels* baseline() { return &baseline_kernels(); }

// Widest first. Constant-initialized (function pointers only), so usable from any initializer.
constexpr Named kSets[] = {
    {"avx512", &avx512_kernels, &cpu_has_avx512},
    {"avx2", &avx2_kernels, &cpu_has_avx2},
    {"baseline", &baseline, &always},
};

bool same_name(const char* a, const char* b) {  // ASCII, case-insensitive
  for (; *a != '\0' && *b != '\0'; ++a, ++b) {
    const int x = std::tolower(static_cast<unsigned char>(*a));
    if (x != std::tolower(static_cast<unsigned char>(*b))) return false;
  }
  return *a == *b;
}

const CpuKernels* named(const char* name) {
  for (const Named& s : kSets) {
    if (same_name(name, s.name)) return s.kernels() != nullptr && s.runs() ? s.kernels() : nullptr;
  }
  return nullptr;
}

// The set FUSEDCLIP_CPU_CAPABILITY names, else the widest this CPU runs. A name no set answers
// raises (every time, until set_capability chooses one), rather than silently running another.
const CpuKernels* best() {
  const char* env = std::getenv("FUSEDCLIP_CPU_CAPABILITY");
  if (env != nullptr && *env != '\0') {
    if (const CpuKernels* k = named(env)) return k;
    throw std::invalid_argument(
        std::string("fusedclip: FUSEDCLIP_CPU_CAPABILITY=") + env +
        " names no chunk-loop set this CPU and build can run (baseline; avx2 on an x86-64 CPU "
        "with AVX2, FMA and F16C; avx512 on one with AVX-512 F, BW, VL and DQ too)");
  }
  for (const Named& s : kSets) {
    if (s.kernels() != nullptr && s.runs()) return s.kernels();
  }
  return &baseline_kernels();
}

std::atomic<const CpuKernels*> current{nullptr};

}  // namespace

const CpuKernels& kernels() {
  const CpuKernels* k = current.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = best();  // may throw, choosing nothing
    current.store(k, std::memory_order_release);
  }
  return *k;
}

const char* capability() {
  const CpuKernels* k = &kernels();
  for (const Named& s : kSets) {
    if (s.kernels() == k) return s.name;
  }
  return "baseline";
}

bool set_capability(const char* name) {
  const CpuKernels* k = named(name);
  if (k == nullptr) return false;
  current.store(k, std::memory_order_release);
  return true;
}

}  // namespace cpu
}  // namespace fusedclip
