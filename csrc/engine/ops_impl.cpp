// The operators' implementations, one function per operator for every device: each looks up (or
// builds) the plan of its tensors and runs its passes on the plan's engine, the engine of the
// tensors' device (device.h). The schemas are in ops.cpp; fake implementations for torch.compile
// live in fusedclip/ops.py; the Python fast path that skips the dispatcher is in bindings.cpp.
//
// The engine comes from the tensors, not from the dispatch key the call arrived with: a call whose
// arguments mix devices arrives under one of them, and is then refused by the argument checks,
// naming the tensors' device, before any pass runs.

#include "engine/ops_impl.h"

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "engine/checks.h"
#include "engine/plan.h"
#include "engine/request.h"

namespace fusedclip {
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
  plan->engine->scale_pass(*plan, coef.const_data_ptr<double>(), false);
}

// The AMP arguments of pass 1 (NormRequest::inv_scale, found_inf), checked, into `r`.
void set_unscale(NormRequest& r, const at::Device& device,
                 const std::optional<at::Tensor>& inv_scale,
                 const std::optional<at::Tensor>& found_inf, const char* op) {
  if (inv_scale.has_value()) {
    check_scalar_arg(*inv_scale, at::kFloat, device, op, "inv_scale");
    r.inv_scale = inv_scale->const_data_ptr<float>();
  }
  if (found_inf.has_value()) {
    check_scalar_arg(*found_inf, at::kFloat, device, op, "found_inf");
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
  plan.engine->norm_pass(plan, r);
  return {norm, coef, per};
}

NormRequest request(double norm_type, double max_norm, bool soft, const char* op) {
  check_norm_args(norm_type, max_norm, op);
  NormRequest r;
  r.p = norm_type;
  r.max_norm = max_norm;
  r.mode = soft ? ClipMode::kSoft : ClipMode::kHard;
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> total_norm(
    at::TensorList tensors, double norm_type, double max_norm, bool per_tensor,
    const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf,
    bool soft) {
  constexpr const char* op = "fusedclip::total_norm";
  NormRequest r = request(norm_type, max_norm, soft, op);
  const auto plan = plan_for(tensors, op);
  set_unscale(r, plan->device, inv_scale, found_inf, op);
  return run_norm(*plan, r, per_tensor);
}

// The rows of a partials tensor (fp64 [rows, 2], contiguous, on `device`), checked.
void check_partials(const at::Tensor& t, int64_t rows, const at::Device& device, const char* op,
                    const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(1) == 2 &&
                  (rows < 0 || t.size(0) == rows) && t.is_contiguous() && t.device() == device,
              op, ": ", name, " must be a contiguous float64 tensor of shape [",
              rows < 0 ? std::string("N") : std::to_string(rows), ", 2] on ", device, ", got ",
              t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)",
              " on ", t.device());
}

void partials_(at::TensorList tensors, double norm_type, const at::Tensor& out) {
  constexpr const char* op = "fusedclip::partials_";
  check_norm_args(norm_type, 0.0, op);
  if (tensors.empty()) return;
  const auto plan = plan_for(tensors, op);
  check_partials(out, static_cast<int64_t>(tensors.size()), plan->device, op, "out");
  NormRequest r;
  r.p = norm_type;
  r.per_tensor_partial = out.data_ptr<double>();
  plan->engine->norm_pass(*plan, r);
}

std::tuple<at::Tensor, at::Tensor> finish_partials(const at::Tensor& partials, double norm_type,
                                                   double max_norm,
                                                   const std::optional<at::Tensor>& inv_scale,
                                                   const std::optional<at::Tensor>& found_inf,
                                                   bool soft) {
  constexpr const char* op = "fusedclip::finish_partials";
  NormRequest r = request(norm_type, max_norm, soft, op);
  const at::Device device = partials.device();
  const DeviceEngine& engine = engine_for(device, op);
  check_partials(partials, -1, device, op, "partials");
  set_unscale(r, device, inv_scale, found_inf, op);
  at::Tensor norm = fp64_scalar(device), coef = fp64_scalar(device);
  r.norm = norm.data_ptr<double>();
  r.coef = coef.data_ptr<double>();
  engine.finish_pass(partials.const_data_ptr<double>(), partials.size(0), device, r);
  return {norm, coef};
}

std::tuple<at::Tensor, at::Tensor> clip_(at::TensorList tensors, double max_norm,
                                         double norm_type, bool per_tensor,
                                         const std::optional<at::Tensor>& inv_scale,
                                         const std::optional<at::Tensor>& found_inf, bool soft) {
  constexpr const char* op = "fusedclip::clip_";
  NormRequest r = request(norm_type, max_norm, soft, op);
  const auto plan = plan_for(tensors, op);
  set_unscale(r, plan->device, inv_scale, found_inf, op);
  bump_versions(tensors);
  auto [norm, coef, per] = run_norm(*plan, r, per_tensor);
  plan->engine->scale_pass(*plan, coef.const_data_ptr<double>(), false);
  return {norm, per};
}

// Per-tensor clipping: tensor t scaled by clip_coef(its norm, max_norms[t]) in the same two passes;
// returns the per-tensor norms before clipping.
at::Tensor clip_per_tensor_(at::TensorList tensors, const at::Tensor& max_norms, double norm_type,
                            bool soft) {
  constexpr const char* op = "fusedclip::clip_per_tensor_";
  NormRequest r = request(norm_type, 0.0, soft, op);
  const auto plan = plan_for(tensors, op);
  const auto n = static_cast<int64_t>(plan->keys.size());
  TORCH_CHECK(max_norms.dim() == 1 && max_norms.size(0) == n, op, ": max_norms must have one "
              "threshold per tensor (", n, "), got shape ", max_norms.sizes());
  TORCH_CHECK(max_norms.scalar_type() == at::kDouble && max_norms.device() == plan->device &&
                  max_norms.is_contiguous(),
              op, ": max_norms must be a contiguous float64 tensor on ", plan->device);
  auto per = at::empty({n}, max_norms.options());
  auto coefs = at::empty({n}, max_norms.options());
  r.per_tensor = per.data_ptr<double>();
  r.per_tensor_max_norm = max_norms.const_data_ptr<double>();
  r.per_tensor_coef = coefs.data_ptr<double>();
  bump_versions(tensors);
  plan->engine->norm_pass(*plan, r);
  plan->engine->scale_pass(*plan, coefs.const_data_ptr<double>(), true);
  return per;
}

// The units of adaptive clipping of t (as timm's unitwise_norm): each row (index of dim 0) of a
// tensor of two or more dims, the whole tensor otherwise; none for an empty tensor. As keys of
// plan entries: the units are laid out, chunked and reduced as tensors of their own.
void append_units(const at::Tensor& t, std::vector<TensorKey>& keys) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const int64_t rows = t.dim() > 1 ? t.size(0) : 1, row = n / rows;
  const auto base = reinterpret_cast<int64_t>(t.const_data_ptr());
  for (int64_t i = 0; i < rows; ++i) {
    keys.push_back({base + i * row * static_cast<int64_t>(t.element_size()), row,
                    t.scalar_type()});
  }
}

// Adaptive gradient clipping: one read of the parameters (their unit norms), one read of the
// gradients (their unit norms, and each unit's coefficient from both), and one write of the
// units that are over their threshold.
void adaptive_clip_(at::TensorList grads, at::TensorList params, double clip_factor, double eps,
                    double norm_type) {
  constexpr const char* op = "fusedclip::adaptive_clip_";
  TORCH_CHECK_VALUE(grads.size() == params.size(), op, ": ", grads.size(), " gradients but ",
                    params.size(), " parameters");
  TORCH_CHECK_VALUE(norm_type > 0.0, op, ": norm_type must be > 0 or inf, got ", norm_type);
  TORCH_CHECK_VALUE(clip_factor >= 0.0, op, ": clip_factor must be >= 0, got ", clip_factor);
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  if (grads.empty()) return;
  const at::Device device = grads[0].device();
  std::vector<TensorKey> grad_units, param_units;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_plain(grads[i], device, op, i);
    check_plain(params[i], device, op, i);
    TORCH_CHECK_VALUE(grads[i].sizes() == params[i].sizes(), op, ": gradient ", i, " has shape ",
                      grads[i].sizes(), " but its parameter ", params[i].sizes());
    TORCH_CHECK_VALUE(grads[i].is_contiguous() && params[i].is_contiguous(), op, ": tensor ", i,
                      " is not contiguous (units are rows in memory order)");
    append_units(grads[i], grad_units);
    append_units(params[i], param_units);
  }
  if (grad_units.empty()) return;
  const auto grad_plan = plan_for(grad_units, device, op);
  // The parameters are only read: they may share memory (tied or overlapping views).
  const auto param_plan = plan_for(param_units, device, op, /*written=*/false);
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  const auto units = static_cast<int64_t>(grad_units.size());
  at::Tensor param_norms = at::empty({units}, f64), coefs = at::empty({units}, f64);
  NormRequest of_params;
  of_params.p = norm_type;
  of_params.per_tensor = param_norms.data_ptr<double>();
  param_plan->engine->norm_pass(*param_plan, of_params);
  NormRequest of_grads;
  of_grads.p = norm_type;
  of_grads.mode = ClipMode::kAdaptive;
  of_grads.per_tensor_max_norm = param_norms.const_data_ptr<double>();
  of_grads.per_tensor_coef = coefs.data_ptr<double>();
  of_grads.agc_eps = eps;
  of_grads.agc_clip_factor = clip_factor;
  grad_plan->engine->norm_pass(*grad_plan, of_grads);
  bump_versions(grads);
  grad_plan->engine->scale_pass(*grad_plan, coefs.const_data_ptr<double>(), true);
}

void clamp_(at::TensorList tensors, double clip_value) {
  constexpr const char* op = "fusedclip::clamp_";
  TORCH_CHECK_VALUE(clip_value >= 0.0, op, ": clip_value must be >= 0, got ", clip_value);
  if (tensors.empty()) return;
  const auto plan = plan_for(tensors, op);
  bump_versions(tensors);
  plan->engine->clamp_pass(*plan, clip_value);
}

}  // namespace

void register_ops(torch::Library& m) {
  m.impl("scale_", &scale_);
  m.impl("total_norm", &total_norm);
  m.impl("partials_", &partials_);
  m.impl("finish_partials", &finish_partials);
  m.impl("clip_", &clip_);
  m.impl("clip_per_tensor_", &clip_per_tensor_);
  m.impl("clamp_", &clamp_);
  m.impl("adaptive_clip_", &adaptive_clip_);
}

}  // namespace fusedclip
