// Operator schemas of the fusedclip namespace and their implementations, one function per operator
// for every device: each looks up (or builds) the plan of its tensors and runs the passes on it,
// through the CUDA kernels or the CPU loops (passes.h). Fake implementations for torch.compile
// live in fusedclip/ops.py; the Python fast path that skips the dispatcher is in bindings.cpp.

#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "passes.h"
#include "plan.h"

namespace fusedclip {

void norm_pass(const Plan& plan, const NormRequest& request) {
  if (plan.device.is_cuda()) {
    norm_pass_cuda(plan, request);
  } else {
    norm_pass_cpu(plan, request);
  }
}

void scale_pass(const Plan& plan, const double* coef) {
  if (plan.device.is_cuda()) {
    scale_pass_cuda(plan, coef);
  } else {
    scale_pass_cpu(plan, coef);
  }
}

namespace {

// The tensors are about to be written in place, as by any in-place op: autograd must see it (and
// an inference tensor outside inference mode raises here, before anything is written).
void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

at::Tensor fp64_scalar(const at::Device& device) {
  return at::empty({}, at::TensorOptions().dtype(at::kDouble).device(device));
}

void scale_(at::TensorList tensors, const at::Tensor& coef) {
  constexpr const char* op = "fusedclip::scale_";
  if (tensors.empty()) return;
  const auto plan = plan_for(tensors, op);
  check_coef(coef, plan->device, op);
  bump_versions(tensors);
  scale_pass(*plan, coef.const_data_ptr<double>());
}

// The AMP arguments of pass 1 (NormRequest::inv_scale, found_inf), checked, into `r`.
void set_unscale(NormRequest& r, const Plan& plan, const std::optional<at::Tensor>& inv_scale,
                 const std::optional<at::Tensor>& found_inf, const char* op) {
  if (inv_scale.has_value()) {
    check_scalar_arg(*inv_scale, at::kFloat, plan.device, op, "inv_scale");
    r.inv_scale = inv_scale->const_data_ptr<float>();
  }
  if (found_inf.has_value()) {
    check_scalar_arg(*found_inf, at::kFloat, plan.device, op, "found_inf");
    r.found_inf = found_inf->data_ptr<float>();
  }
}

// Pass 1 into fresh outputs: (norm, coef, per-tensor norms or an empty tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_norm(const Plan& plan, NormRequest r,
                                                        bool per_tensor) {
  auto norm = fp64_scalar(plan.device);
  auto coef = fp64_scalar(plan.device);
  auto per = at::empty({per_tensor ? static_cast<int64_t>(plan.keys.size()) : 0},
                       norm.options());
  r.norm = norm.data_ptr<double>();
  r.coef = coef.data_ptr<double>();
  r.per_tensor = per_tensor ? per.data_ptr<double>() : nullptr;
  norm_pass(plan, r);
  return {norm, coef, per};
}

NormRequest request(double norm_type, double max_norm, const char* op) {
  check_norm_args(norm_type, max_norm, op);
  NormRequest r;
  r.p = norm_type;
  r.max_norm = max_norm;
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> total_norm(
    at::TensorList tensors, double norm_type, double max_norm, bool per_tensor,
    const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fusedclip::total_norm";
  NormRequest r = request(norm_type, max_norm, op);
  const auto plan = plan_for(tensors, op);
  set_unscale(r, *plan, inv_scale, found_inf, op);
  return run_norm(*plan, r, per_tensor);
}

std::tuple<at::Tensor, at::Tensor> clip_(at::TensorList tensors, double max_norm,
                                         double norm_type, bool per_tensor,
                                         const std::optional<at::Tensor>& inv_scale,
                                         const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fusedclip::clip_";
  NormRequest r = request(norm_type, max_norm, op);
  const auto plan = plan_for(tensors, op);
  set_unscale(r, *plan, inv_scale, found_inf, op);
  bump_versions(tensors);
  auto [norm, coef, per] = run_norm(*plan, r, per_tensor);
  scale_pass(*plan, coef.const_data_ptr<double>());
  return {norm, per};
}

}  // namespace
}  // namespace fusedclip

TORCH_LIBRARY(fusedclip, m) {
  // t <- t * coef for every tensor, in place; coef is a one-element fp64 tensor on the tensors'
  // device. Writes nothing when coef is exactly 1. Pass 2 of the fused clip.
  m.def("scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  // Pass 1: the norm_type-norm of all tensors as if concatenated (fp64, 0-dim), the coefficient
  // min(1, max_norm / (norm + 1e-6)) (fp64, 0-dim), and each tensor's own norm (fp64, one per
  // tensor, or empty unless per_tensor). One read of every element, no host synchronization.
  // AMP: with inv_scale (fp32, one element) the tensors hold loss-scaled values; the norms are
  // those of the unscaled values and the coefficient is inv_scale * min(...), the factor that
  // unscales and clips in one multiply. found_inf (fp32, one element) is set to 1 when any element
  // is inf or NaN and left as it is otherwise, as torch's _amp_foreach_non_finite_check_and_unscale_
  // does.
  m.def("total_norm(Tensor[] tensors, float norm_type, float max_norm, bool per_tensor, "
        "Tensor? inv_scale=None, Tensor(a!)? found_inf=None) -> (Tensor, Tensor, Tensor)");
  // Both passes: global-norm clipping in place (unscaling too, given inv_scale); returns
  // (norm, per-tensor norms) as total_norm.
  m.def("clip_(Tensor(a!)[] tensors, float max_norm, float norm_type, bool per_tensor, "
        "Tensor? inv_scale=None, Tensor(b!)? found_inf=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("scale_", &fusedclip::scale_);
  m.impl("total_norm", &fusedclip::total_norm);
  m.impl("clip_", &fusedclip::clip_);
}

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("scale_", &fusedclip::scale_);
  m.impl("total_norm", &fusedclip::total_norm);
  m.impl("clip_", &fusedclip::clip_);
}
