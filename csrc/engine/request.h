// What pass 1 is asked for (NormRequest): its inputs besides the tensors and the outputs it
// writes, and write_tensor_outputs, the per-tensor outputs every device's pass 1 writes alike.
// Plain data and host/device arithmetic: included by host code and by the CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "engine/norm_math.h"

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
  void* norm_out = nullptr;      // [1] of norm_out_dtype: the norm as clip_grad_norm_ returns it
  at::ScalarType norm_out_dtype = at::kDouble;
  double* per_tensor = nullptr;  // fp64 [T]: each tensor's own norm
  // fp64 [T, 2]: each tensor's own partial (m, s) of its raw elements (before inv_scale), as
  // finish_partials combines them: what BackwardClipper keeps per gradient.
  double* per_tensor_partial = nullptr;
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
  // Whether anything per tensor is asked for.
  FUSEDCLIP_HD bool wants_tensors() const {
    return per_tensor || per_tensor_coef || per_tensor_partial;
  }
};

// Tensor t's outputs of pass 1 from its own partial: its partial, its (unscaled) norm and, for
// per-tensor clipping, its coefficient. Shared by the CUDA finish and the CPU mirror.
FUSEDCLIP_HD void write_tensor_outputs(const NormRequest& r, int64_t t, Partial own, NormKind kind,
                                       double inv) {
  if (r.per_tensor_partial) {
    r.per_tensor_partial[2 * t] = own.m;
    r.per_tensor_partial[2 * t + 1] = own.s;
  }
  if (!(r.per_tensor || r.per_tensor_coef)) return;
  const double norm = finish_norm(own, r.p, kind, inv);
  if (r.per_tensor) r.per_tensor[t] = norm;
  if (r.per_tensor_coef) {
    double limit = r.per_tensor_max_norm ? r.per_tensor_max_norm[t] : r.max_norm;
    if (r.mode == ClipMode::kAdaptive) {
      limit = (limit < r.agc_eps ? r.agc_eps : limit) * r.agc_clip_factor;  // NaN stays NaN
    }
    r.per_tensor_coef[t] = clip_coef(norm, limit, r.mode) * inv;
  }
}

}  // namespace fusedclip
