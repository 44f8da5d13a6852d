// Argument checks of the operators in ops.cpp (the tensors themselves are checked by plan.cpp's
// check_plain when their plan is looked up).
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fusedclip {

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// coef: a one-element fp64 tensor (the clip coefficient, read on the device) on `device`.
inline void check_coef(const at::Tensor& coef, const at::Device& device, const char* op) {
  TORCH_CHECK(coef.numel() == 1, op, ": coef must have one element, got ", coef.numel());
  TORCH_CHECK(coef.scalar_type() == at::kDouble, op, ": coef must be float64, got ",
              coef.scalar_type());
  TORCH_CHECK(coef.device() == device, op, ": coef is on ", coef.device(), " but tensors[0] is on ",
              device);
}

// norm_type: p > 0 or inf. max_norm: >= 0 or inf, not NaN.
inline void check_norm_args(double norm_type, double max_norm, const char* op) {
  TORCH_CHECK_VALUE(norm_type > 0.0, op, ": norm_type must be > 0 or inf, got ", norm_type);
  TORCH_CHECK_VALUE(max_norm >= 0.0, op, ": max_norm must be >= 0, got ", max_norm);
}

}  // namespace fusedclip
