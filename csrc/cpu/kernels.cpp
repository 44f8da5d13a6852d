// Which chunk-loop set the CPU engine runs (cpu/kernels.h): chosen once, at first use.

#include "cpu/kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fusedclip {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const CpuKernels* named(const char* name) {
  if (std::strcmp(name, "baseline") == 0) return &baseline_kernels();
  if (std::strcmp(name, "avx2") == 0 && avx2_kernels() != nullptr && cpu_has_avx2()) {
    return avx2_kernels();
  }
  return nullptr;
}

const CpuKernels* best() {
  const char* env = std::getenv("FUSEDCLIP_CPU_CAPABILITY");
  if (env != nullptr && *env != '\0') {
    if (const CpuKernels* k = named(env)) return k;
    throw std::invalid_argument(
        std::string("fusedclip: FUSEDCLIP_CPU_CAPABILITY=") + env +
        " names no chunk-loop set this CPU and build can run (baseline, or avx2 on an x86-64 CPU "
        "with AVX2, FMA and F16C)");
  }
  const CpuKernels* avx2 = named("avx2");
  return avx2 != nullptr ? avx2 : &baseline_kernels();
}

std::atomic<const CpuKernels*>& current() {
  static std::atomic<const CpuKernels*> k{best()};
  return k;
}

}  // namespace

const CpuKernels& kernels() { return *current().load(std::memory_order_relaxed); }

const char* capability() { return &kernels() == &baseline_kernels() ? "baseline" : "avx2"; }

bool set_capability(const char* name) {
  const CpuKernels* k = named(name);
  if (k == nullptr) return false;
  current().store(k, std::memory_order_relaxed);
  return true;
}

}  // namespace cpu
}  // namespace fusedclip
