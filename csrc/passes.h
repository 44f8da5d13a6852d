// The two passes of a fused clip over a plan's tensors, for CUDA (norm_kernels.cu,
// scale_kernels.cu) and the CPU (cpu_passes.cpp). The CPU versions walk the same table with the
// same arithmetic (norm_math.h); they exist so the table, the chunking and the reduction rules are
// tested on every machine, and they are how the operators run on CPU tensors.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "plan.h"

namespace fusedclip {

// What pass 1 reads besides the tensors and what it writes, all on the plan's device. Pointers
// that are null are not read or written.
//
// With inv_scale (the AMP path: gradients still multiplied by a loss scale), every norm is that of
// the unscaled elements x * inv_scale, and coef is the factor that unscales and clips in one
// multiply: inv_scale * min(1, max_norm / (norm + 1e-6)). Norms are homogeneous, so the elements
// are not multiplied one by one: the norm of the raw elements, accumulated in fp64, is multiplied
// once. found_inf is the per-element check: m of the total partial is non-finite exactly when some
// element is inf or NaN (norm_math.h), whatever the norm would have rounded to.
struct NormRequest {
  double p = 2.0;
  double max_norm = INFINITY;
  const float* inv_scale = nullptr;  // fp32 [1]: the inverse loss scale, read on the device
  float* found_inf = nullptr;        // fp32 [1]: set to 1 when an element is inf/NaN, never cleared
  double* norm = nullptr;        // fp64 [1]: the total norm
  double* coef = nullptr;        // fp64 [1]: [inv_scale *] min(1, max_norm / (norm + 1e-6))
  void* norm_out = nullptr;      // [1] of norm_out_dtype: the norm as torch returns it
  at::ScalarType norm_out_dtype = at::kDouble;
  double* per_tensor = nullptr;  // fp64 [T]: each tensor's own norm
};

// Pass 1: one read of every element; partials per chunk, and the last block to finish reduces
// them in a fixed order and writes the request's outputs. Deterministic, no host synchronization.
void norm_pass(const Plan& plan, const NormRequest& request);
// Pass 2: every element times *coef (fp64, on the device), in place; no writes when it is 1.
void scale_pass(const Plan& plan, const double* coef);

void norm_pass_cuda(const Plan& plan, const NormRequest& request);
void scale_pass_cuda(const Plan& plan, const double* coef);
void norm_pass_cpu(const Plan& plan, const NormRequest& request);
void scale_pass_cpu(const Plan& plan, const double* coef);

// Copies n int64 values from host memory to dst (device memory of the current device) through
// kernel arguments, on the current stream; capturable.
void upload_table_cuda(int64_t* dst, const int64_t* src, int64_t n);

}  // namespace fusedclip
