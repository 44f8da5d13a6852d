// The `fusedclip._C` Python module: loading it registers the operators (ops.cpp), and it offers
// the hot path of clip_grad_norm_ that the dispatcher cannot: it takes the parameter list itself,
// reads every .grad in C++, checks the cached plan still matches, and launches both passes. For
// 5,000 parameters that is a few nanoseconds each instead of the microseconds a Python loop over
// .grad and a Tensor[] argument cost.

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "checks.h"
#include "passes.h"
#include "plan.h"

namespace py = pybind11;

namespace fusedclip {
namespace {

// A gradient the fused kernels take as it is; anything else (sparse, strided with gaps, a tensor
// subclass, an inference tensor, another device...) sends the call to the Python path, which
// either handles it or raises the documented error.
bool is_plain_grad(const at::Tensor& g, const at::Device& device) {
  return g.layout() == at::kStrided && g.device() == device && is_kernel_dtype(g.scalar_type()) &&
         g.has_storage() && !g.unsafeGetTensorImpl()->is_python_dispatch() && !g.is_neg() &&
         !g._is_zerotensor() && !g.is_inference() && g.is_non_overlapping_and_dense();
}

// clip_grad_norm_ over `params` (a list of tensors) when every existing gradient is plain and on
// one device (a CUDA device when cuda_only); returns the norm as torch does (the gradients' dtypes
// promoted), or None to say "take the general path". Raises, touching nothing, when two gradients
// share memory.
py::object clip_params(py::handle params, double max_norm, double norm_type, bool cuda_only) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "fusedclip.clip_grad_norm_";
  if (!PyList_Check(params.ptr())) return py::none();
  PyObject* list = params.ptr();
  const Py_ssize_t n = PyList_GET_SIZE(list);
  std::vector<TensorKey> keys;
  // Borrowed: the parameters keep their gradients alive for the length of this call (the GIL is
  // held throughout; replacing .grad from another thread during the call is the caller's race).
  std::vector<c10::TensorImpl*> grads;
  keys.reserve(n);
  grads.reserve(n);
  at::Device device(at::kCPU);
  PyTypeObject* checked_type = nullptr;  // nn.Parameter, usually: one isinstance check, not n
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    if (Py_TYPE(item) != checked_type) {
      if (!THPVariable_Check(item)) return py::none();
      checked_type = Py_TYPE(item);
    }
    // TensorImpl::grad directly: TensorBase::grad adds a non-leaf warning check per call.
    const at::Tensor& g = THPVariable_Unpack(item).unsafeGetTensorImpl()->grad();
    if (!g.defined()) continue;
    if (grads.empty()) {
      device = g.device();
      if (!device.is_cuda() && (cuda_only || !device.is_cpu())) return py::none();
    }
    if (!is_plain_grad(g, device)) return py::none();
    keys.push_back(key_of(g));
    grads.push_back(g.unsafeGetTensorImpl());
  }
  if (grads.empty()) return py::none();
  check_norm_args(norm_type, max_norm, op);
  const auto plan = plan_for(keys, device, op);

  at::Tensor out = at::empty({}, at::TensorOptions().dtype(plan->result_dtype).device(device));
  at::Tensor coef = at::empty({}, at::TensorOptions().dtype(at::kDouble).device(device));
  NormRequest r;
  r.p = norm_type;
  r.max_norm = max_norm;
  r.coef = coef.data_ptr<double>();
  r.norm_out = out.data_ptr();
  r.norm_out_dtype = plan->result_dtype;
  // The gradients are written in place, as by any in-place op: autograd must see it.
  for (c10::TensorImpl* g : grads) g->bump_version();
  norm_pass(*plan, r);
  scale_pass(*plan, coef.const_data_ptr<double>());
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace
}  // namespace fusedclip

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedclip operators (registered as torch.ops.fusedclip) and the clip fast path";
  m.def("clip_params", &fusedclip::clip_params, py::arg("params"), py::arg("max_norm"),
        py::arg("norm_type"), py::arg("cuda_only") = true,
        "clip_grad_norm_ on a list of parameters through the cached plan, or None when the "
        "gradients need the general path");
  m.def("plans_built", &fusedclip::plans_built, "plans built since the process started");
  m.def("clear_plan_cache", &fusedclip::clear_plan_cache,
        "drop every cached plan that no captured CUDA graph uses");
}
