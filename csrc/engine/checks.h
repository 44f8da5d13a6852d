// Argument checks of the operators (ops_impl.cpp) and the fast path (bindings.cpp); the tensors
// themselves are checked by plan.cpp's check_plain when their plan is looked up.
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fusedclip {

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A one-element tensor of `dtype` on `device`, read (or written) by a kernel on the device.
// (dtype is kFloat or kDouble, named as Python names them.)
inline void check_scalar_arg(const at::Tensor& t, at::ScalarType dtype, const at::Device& device,
                             const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got ", t.numel());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ",
              dtype == at::kDouble ? "float64" : "float32", ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
              " but tensors[0] is on ", device);
}

// coef: the clip coefficient, fp64.
inline void check_coef(const at::Tensor& coef, const at::Device& device, const char* op) {
  check_scalar_arg(coef, at::kDouble, device, op, "coef");
}

// norm_type: p > 0 or inf. max_norm: >= 0 or inf, not NaN.
inline void check_norm_args(double norm_type, double max_norm, const char* op) {
  TORCH_CHECK_VALUE(norm_type > 0.0, op, ": norm_type must be > 0 or inf, got ", norm_type);
  TORCH_CHECK_VALUE(max_norm >= 0.0, op, ": max_norm must be >= 0, got ", max_norm);
}

}  // namespace fusedclip
