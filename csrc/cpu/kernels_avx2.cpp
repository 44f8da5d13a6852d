// The chunk loops built for AVX2, FMA and F16C (Haswell and later, Zen): 32-byte vectors and
// one-instruction fp16 conversions. Only this file's functions carry the target; the engine calls
// them after checking the CPU (cpu/kernels.cpp). FMA contraction stays off (the build's
// -ffp-contract=off), so the values are the baseline's.

#include "cpu/kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace fusedclip {
namespace cpu {
namespace {

#define FUSEDCLIP_AVX2 1
#define FUSEDCLIP_AVX512 0
#include "cpu/chunk_loops.h"
#undef FUSEDCLIP_AVX512
#undef FUSEDCLIP_AVX2

}  // namespace
}  // namespace cpu
}  // namespace fusedclip

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fusedclip {
namespace cpu {
const CpuKernels* avx2_kernels() { return &kKernels; }
}  // namespace cpu
}  // namespace fusedclip

#else

namespace fusedclip {
namespace cpu {
const CpuKernels* avx2_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace fusedclip

#endif
