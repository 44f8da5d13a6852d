// Argument checks shared by the CPU and CUDA implementations of the operators in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fusedclip {

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// scale_(tensors, coef): every tensor a dense (contiguous or permuted, no gaps) floating tensor on
// coef's device, and coef a one-element fp64 tensor (the clip coefficient, read on the device).
// Sparse tensors never get here: the dispatcher has no sparse kernel to send them to.
inline void check_scale_args(at::TensorList tensors, const at::Tensor& coef) {
  TORCH_CHECK(coef.numel() == 1, "fusedclip::scale_: coef must have one element, got ",
              coef.numel());
  TORCH_CHECK(coef.scalar_type() == at::kDouble,
              "fusedclip::scale_: coef must be float64, got ", coef.scalar_type());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "fusedclip::scale_: tensors[", i,
                "] has dtype ", t.scalar_type(), "; expected float32, float64, float16 or bfloat16");
    TORCH_CHECK(t.device() == coef.device(), "fusedclip::scale_: tensors[", i, "] is on ",
                t.device(), " but coef is on ", coef.device());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "fusedclip::scale_: tensors[", i,
                "] is a view with gaps or overlapping elements; scale_ takes dense tensors "
                "(contiguous or permuted)");
  }
}

}  // namespace fusedclip
