// Kernel variants chosen at run time, without a rebuild: today the shape of the CUDA pass-1 kernel
// (threads per block, 16-byte loads in flight per thread) for p = 2 on fp32, bf16 and fp16. Every
// variant is compiled in; FUSEDCLIP_CUDA_PASS1 (or set_pass1_variant) picks one at launch. A
// variant changes the per-chunk reduction tree, so the last bits of a norm may differ between
// variants; with one variant the results are bitwise identical from run to run. No CUDA here: the
// choice is parsed and tested in every build.
#pragma once

namespace fusedclip {

struct Pass1Variant {
  const char* name;
  int threads;  // per block
  int unroll;   // 16-byte loads issued per thread before the first is used
};

// Index 0 is the default. norm_kernels.cu instantiates each entry by its index.
inline constexpr Pass1Variant kPass1Variants[] = {
    {"t512u4", 512, 4}, {"t512u8", 512, 8}, {"t256u8", 256, 8}, {"t1024u4", 1024, 4}};
inline constexpr int kNumPass1Variants = sizeof(kPass1Variants) / sizeof(kPass1Variants[0]);

// The variant in use: FUSEDCLIP_CUDA_PASS1 at first use (default t512u4), or the last
// set_pass1_variant. A value naming no variant throws std::invalid_argument (a ValueError in
// Python), at every use until set_pass1_variant chooses one, rather than silently running another.
int pass1_variant();
const char* pass1_variant_name();
// Chooses a variant by name; false (nothing changed) when none has that name.
bool set_pass1_variant(const char* name);
// "t512u4, t512u8, ...": for error messages.
const char* pass1_variant_names();

}  // namespace fusedclip
