// The chunk loops built for AVX-512 (F, BW, VL, DQ; Skylake-SP and later, Zen 4): 64-byte vectors,
// and eight fp32 <-> fp64 conversions or 16-bit narrowings per instruction, which is what the
// bf16/fp16 scale needs (AVX2 runs out of shuffle throughput there: measured 1.7 against 4.6
// billion bf16 elements/s per core). Only this file's functions carry the target; the engine
// calls them after checking the CPU (cpu/kernels.cpp). FMA contraction stays off (the build's
// -ffp-contract=off), so the values are the baseline's.

#include "cpu/kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's own avx512fintrin.h trips this on its _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__clang__)
#pragma clang attribute push(                                                            \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

namespace fusedclip {
namespace cpu {
namespace {

#define FUSEDCLIP_AVX2 0
#define FUSEDCLIP_AVX512 1
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
const CpuKernels* avx512_kernels() { return &kKernels; }
}  // namespace cpu
}  // namespace fusedclip

#else

namespace fusedclip {
namespace cpu {
const CpuKernels* avx512_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace fusedclip

#endif
