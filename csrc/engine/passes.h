// The two passes of a fused clip over a plan's tensors, for CUDA (norm_kernels.cu,
// scale_kernels.cu) and the CPU (cpu_passes.cpp). The CPU versions walk the same table with the
// same arithmetic (norm_math.h); they exist so the table, the chunking and the reduction rules are
// tested on every machine, and they are how the operators run on CPU tensors.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "engine/norm_math.h"
#include "engine/plan.h"

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
  ClipMode mode = ClipMode::kHard;  // how norms become coefficients (coef, per_tensor_coef)
  // Per-tensor clipping: each tensor's own coefficient, [inv_scale *] clip_coef(its norm, its
  // threshold), fp64 [T]; the thresholds are per_tensor_max_norm (fp64 [T]) or max_norm for all.
  const double* per_tensor_max_norm = nullptr;
  double* per_tensor_coef = nullptr;
  // Adaptive clipping (mode kAdaptive): the threshold of tensor (unit) t is
  // max(per_tensor_max_norm[t], agc_eps) * agc_clip_factor, per_tensor_max_norm holding the
  // norms of the parameters' units.
  double agc_eps = 0.0;
  double agc_clip_factor = 1.0;

  // Whether any total (over all tensors) is asked for: per-tensor clipping and AGC ask for none,
  // and the combination of every chunk partial in one block is then skipped.
  FUSEDCLIP_HD bool wants_total() const { return norm || coef || norm_out || found_inf; }
};

// Tensor t's outputs of pass 1 from its (unscaled) norm: the norm and, for per-tensor clipping,
// its coefficient. Shared by the CUDA finish and the CPU mirror.
FUSEDCLIP_HD void write_tensor_outputs(const NormRequest& r, int64_t t, double norm,
                                              double inv) {
  if (r.per_tensor) r.per_tensor[t] = norm;
  if (r.per_tensor_coef) {
    double limit = r.per_tensor_max_norm ? r.per_tensor_max_norm[t] : r.max_norm;
    if (r.mode == ClipMode::kAdaptive) {
      limit = (limit < r.agc_eps ? r.agc_eps : limit) * r.agc_clip_factor;  // NaN stays NaN
    }
    r.per_tensor_coef[t] = clip_coef(norm, limit, r.mode) * inv;
  }
}

// Pass 1: one read of every element; partials per chunk, and the last block to finish reduces
// them in a fixed order and writes the request's outputs. Deterministic, no host synchronization.
void norm_pass(const Plan& plan, const NormRequest& request);
// Pass 2: every element times its coefficient (fp64, on the device), in place: *coef, or with
// per_tensor coef[t] for the elements of tensor t. No writes to a chunk whose coefficient is 1.
void scale_pass(const Plan& plan, const double* coef, bool per_tensor = false);
// Value clipping in one pass: every element clamped to [-bound, bound], bound = clip_value rounded
// to the element's dtype (as torch converts a Python bound); NaN stays NaN.
void clamp_pass(const Plan& plan, double clip_value);

void norm_pass_cuda(const Plan& plan, const NormRequest& request);
void scale_pass_cuda(const Plan& plan, const double* coef, bool per_tensor);
void clamp_pass_cuda(const Plan& plan, double clip_value);
void norm_pass_cpu(const Plan& plan, const NormRequest& request);
void scale_pass_cpu(const Plan& plan, const double* coef, bool per_tensor);
void clamp_pass_cpu(const Plan& plan, double clip_value);

// Copies n int64 values from host memory to dst (device memory of the current device) through
// kernel arguments, on the current stream; capturable.
void upload_table_cuda(int64_t* dst, const int64_t* src, int64_t n);

}  // namespace fusedclip
