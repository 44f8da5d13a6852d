// The chunk loops built for AVX-512 (F, BW, VL, DQ; Skylake-SP and later, Zen 4): 64-byte vectors,
// and eight fp32 <-> fp64 conversions or 16-bit narrowings per instruction, which is what the
// bf16/fp16 scale needs (AVX2 runs out of shuffle throughput there: measured 1.7 against 3+
// billion bf16 elements/s per core) (cpu/kernels_isa.inc).

#define FUSEDCLIP_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define FUSEDCLIP_AVX2 0
#define FUSEDCLIP_AVX512 1
#define FUSEDCLIP_ISA_KERNELS avx512_kernels
#include "cpu/kernels_isa.inc"
