// The CPU engine's chunk loops (cpu/chunk_loops.h) as a table of functions per instruction set,
// and the choice of the set this process runs: the widest the CPU has of AVX-512 (F, BW, VL, DQ),
// AVX2 (with FMA and F16C) and the baseline. Every set computes the same values bit for bit
// (chunk_loops.h), so the choice only changes the speed; FUSEDCLIP_CPU_CAPABILITY=baseline|avx2|
// avx512 overrides it (the tests run each one the CPU has).
#pragma once

#include <cstdint>

namespace fusedclip {
namespace cpu {

// Function arrays are indexed by storage type: bf16, fp16, fp32 (and fp64 where it has one).
enum StorageIndex : int { kBF16 = 0, kF16 = 1, kF32 = 2, kF64 = 3 };

struct CpuKernels {
  // Plain fp64 sum of x^2 (of |x|) over n elements of a 16/32-bit type.
  double (*sum_squares[3])(const void* data, int64_t n);
  double (*sum_abs[3])(const void* data, int64_t n);
  // max |x|, NaN if any x is NaN.
  double (*max_abs[4])(const void* data, int64_t n);
  // fp64 elements, [0] squares and [1] magnitudes: sum = the sum of |x / scale|^p with scale a
  // power of two near max |x|; false when max |x| (always written to *max) is 0, non-finite or
  // tiny, and the caller's scalar loop takes the chunk.
  bool (*scaled_sum_f64[2])(const void* data, int64_t n, double* scale, double* sum, double* max);
  // Any other p > 0: the sum of (|x| / max)^p, max = max |x| (finite and positive).
  double (*power_sum[4])(const void* data, int64_t n, double p, double max);
  // In place: x * c (fp64 product, rounded once to fp32 and then to the storage type).
  void (*scale[4])(void* data, int64_t n, double c);
  // In place: x clamped to [-bound, bound], bound a value of the storage type.
  void (*clamp[4])(void* data, int64_t n, double bound);
};

const CpuKernels& baseline_kernels();
// The AVX2 and AVX-512 sets, or null when this build has none (not x86-64, or a compiler without
// target attributes).
const CpuKernels* avx2_kernels();
const CpuKernels* avx512_kernels();

// The set in use.
const CpuKernels& kernels();
// Its name: "avx512", "avx2" or "baseline".
const char* capability();
// Switches to the named set; false (changing nothing) when it is unknown or this CPU or build
// cannot run it.
bool set_capability(const char* name);

}  // namespace cpu
}  // namespace fusedclip
