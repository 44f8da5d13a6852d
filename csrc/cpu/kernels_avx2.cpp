// The chunk loops built for AVX2, FMA and F16C (Haswell and later, Zen): 32-byte vectors and
// one-instruction fp16 conversions (cpu/kernels_isa.inc).

#define FUSEDCLIP_ISA_TARGET "avx2,fma,f16c"
#define FUSEDCLIP_AVX2 1
#define FUSEDCLIP_AVX512 0
#define FUSEDCLIP_ISA_KERNELS avx2_kernels
#include "cpu/kernels_isa.inc"
