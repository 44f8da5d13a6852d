// The chunk loops for any CPU this build targets (SSE2 on x86-64): the fallback, and the set the
// tests compare the others with bit for bit.

#include "cpu/kernels.h"

#if defined(__SSE2__)
#include <emmintrin.h>  // the fp32/fp64 clamp's MAXPS/MINPS (chunk_loops.h)
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of internal functions only

namespace fusedclip {
namespace cpu {
namespace {

#define FUSEDCLIP_AVX2 0
#define FUSEDCLIP_AVX512 0
#include "cpu/chunk_loops.h"
#undef FUSEDCLIP_AVX512
#undef FUSEDCLIP_AVX2

}  // namespace

const CpuKernels& baseline_kernels() { return kKernels; }

}  // namespace cpu
}  // namespace fusedclip
