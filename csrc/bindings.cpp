// The `fusedclip._C` Python module: loading it registers the operators (ops.cpp), and it offers
// the hot path of clip_grad_norm_ that the dispatcher cannot: it takes the parameter list itself,
// reads every .grad in C++, checks the cached plan still matches, and launches both passes. For
// 5,000 parameters that is a few nanoseconds each instead of the microseconds a Python loop over
// .grad and a Tensor[] argument cost.

#include <ATen/ops/empty.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "cpu/kernels.h"
#include "engine/checks.h"
#include "engine/device.h"
#include "engine/plan.h"
#include "engine/request.h"
#include "engine/tuning.h"

namespace py = pybind11;

namespace fusedclip {
namespace {

// A gradient the fused kernels take as it is; anything else (sparse, strided with gaps, a tensor
// subclass, an inference tensor, another device...) sends the call to the Python path, which
// either handles it or raises the documented error. So does a device without an engine in this
// build (CUDA gradients when fusedclip._C was built without its CUDA kernels).
// Asked of the TensorImpl, once per gradient on the one-call path, so with no call left in it:
// flatten inlines the strides test (emitted out of line, and called through the PLT), and the
// storage is tested for what plain_key_of reads, where has_storage() is a virtual call.
__attribute__((flatten)) bool is_plain_grad(c10::TensorImpl& g, const at::Device& device) {
  return g.layout() == at::kStrided && g.device() == device &&
         is_kernel_dtype(c10::typeMetaToScalarType(g.dtype())) &&
         g.unsafe_storage().unsafeGetStorageImpl() != nullptr && !g.is_python_dispatch() &&
         !g.is_neg() && !g._is_zerotensor() && !g.is_inference() &&
         g.is_non_overlapping_and_dense();
}

// key_of (engine/plan.h) of a gradient that passed is_plain_grad, for the one-call path's loop:
// the data pointer read from the storage is_plain_grad tested (TensorImpl::data() would test it
// again, through a virtual call), and inlined: key_of's struct, returned through memory, stalled
// the loop's 16-byte reload of it (store forwarding), by a third in some processes.
C10_ALWAYS_INLINE TensorKey plain_key_of(const c10::TensorImpl& g) {
  const int64_t n = g.numel();
  const at::ScalarType dtype = c10::typeMetaToScalarType(g.dtype());
  if (n == 0) return {0, 0, dtype};
  const auto* data = static_cast<const char*>(g.unsafe_storage().data()) +
                     g.storage_offset() * static_cast<int64_t>(c10::elementSize(dtype));
  return {static_cast<int64_t>(reinterpret_cast<uintptr_t>(data)), n, dtype};
}

// The gradients of `params` (a Python list of tensors) when every existing one is plain and all
// are on one device that has an engine (a CUDA device when cuda_only): their keys, borrowed
// TensorImpls and device.
// False means "take the general path" (which validates everything and raises where it must).
struct PlainGrads {
  std::vector<TensorKey> keys;
  // Borrowed: the parameters keep their gradients alive for the length of the call (the GIL is
  // held throughout; replacing .grad from another thread meanwhile is the caller's race).
  std::vector<c10::TensorImpl*> impls;
  at::Device device{at::kCPU};

  // allow_half false: an fp16 gradient also means "general path" (the AMP path refuses fp16
  // gradients, as GradScaler.unscale_ does, and the general path raises that error).
  bool collect(py::handle params, bool cuda_only, bool allow_half = true) {
    if (!PyList_Check(params.ptr())) return false;
    PyObject* list = params.ptr();
    const Py_ssize_t n = PyList_GET_SIZE(list);
    keys.reserve(n);
    impls.reserve(n);
    PyTypeObject* checked_type = nullptr;  // nn.Parameter, usually: one isinstance check, not n
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(list, i);
      if (Py_TYPE(item) != checked_type) {
        if (!THPVariable_Check(item)) return false;
        checked_type = Py_TYPE(item);
      }
      // TensorImpl::grad directly: TensorBase::grad adds a non-leaf warning check per call.
      const at::Tensor& grad = THPVariable_Unpack(item).unsafeGetTensorImpl()->grad();
      if (grad.defined()) impls.push_back(grad.unsafeGetTensorImpl());
    }
    // The gradients' own fields in a second loop, which knows their addresses ahead and asks for
    // them early: a gradient's TensorImpl (three cache lines) eight ahead, its storage four. Each
    // gradient costs a few cache misses in this C++ loop; taken one after the other in a single
    // loop they overlapped little (5,000 gradients: 14.6 ns each, against 12.1 so, and 10.3 for
    // the bare loop of grad_pointer_floor; Zen 4).
    const size_t count = impls.size();
    for (size_t i = 0; i < count; ++i) {
      if (i + 8 < count) {
        const char* ahead = reinterpret_cast<const char*>(impls[i + 8]);
        for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) {
          __builtin_prefetch(ahead + line);
        }
      }
      if (i + 4 < count) __builtin_prefetch(impls[i + 4]->unsafe_storage().unsafeGetStorageImpl());
      c10::TensorImpl* g = impls[i];
      if (i == 0) {
        device = g->device();
        if (find_engine(device.type()) == nullptr || (cuda_only && !device.is_cuda())) {
          return false;
        }
      }
      if (!is_plain_grad(*g, device)) return false;
      keys.push_back(plain_key_of(*g));
      if (!allow_half && keys.back().dtype == at::kHalf) return false;
    }
    return count != 0;
  }

  // They are about to be written in place, as by any in-place op: autograd must see it.
  void bump_versions() const {
    for (c10::TensorImpl* g : impls) g->bump_version();
  }
};

// A one-element tensor argument of the fast path (AMP: the inverse scale, the found-inf flag), or
// null for None.
const at::Tensor* optional_tensor(py::handle obj, at::ScalarType dtype, const at::Device& device,
                                  const char* op, const char* name) {
  if (obj.is_none()) return nullptr;
  TORCH_CHECK_TYPE(THPVariable_Check(obj.ptr()), op, ": ", name, " must be a tensor or None");
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  check_scalar_arg(t, dtype, device, op, name);
  return &t;
}

// Pass 1 (and, with `scale`, pass 2) of clip_grad_norm_ over `params` through the cached plan:
// (the norm as clip_grad_norm_ returns it, the fp64 factor pass 2 multiplies by, the fp64 norm),
// or None to say "take the general path". Raises, touching nothing, when two gradients share
// memory. inv_scale/found_inf: the AMP path (NormRequest); soft: the soft coefficient.
py::object run_params(py::handle params, double max_norm, double norm_type, bool cuda_only,
                      py::handle inv_scale, py::handle found_inf, bool soft, bool scale) {
  constexpr const char* op = "fusedclip.clip_grad_norm_";
  PlainGrads grads;
  // Unscaling GradScaler's gradients: fp16 ones take the general path, which refuses them.
  if (!grads.collect(params, cuda_only, inv_scale.is_none())) return py::none();
  check_norm_args(norm_type, max_norm, op);
  const at::Tensor* inv = optional_tensor(inv_scale, at::kFloat, grads.device, op, "inv_scale");
  const at::Tensor* found = optional_tensor(found_inf, at::kFloat, grads.device, op, "found_inf");
  const auto plan = plan_for(grads.keys, grads.device, op);

  const auto on_device = at::TensorOptions().device(grads.device);
  at::Tensor out = at::empty({}, on_device.dtype(plan->result_dtype));
  at::Tensor coef = at::empty({}, on_device.dtype(at::kDouble));
  at::Tensor norm = at::empty({}, on_device.dtype(at::kDouble));
  NormRequest r;
  r.p = norm_type;
  r.max_norm = max_norm;
  r.mode = soft ? ClipMode::kSoft : ClipMode::kHard;
  r.inv_scale = inv ? inv->const_data_ptr<float>() : nullptr;
  r.found_inf = found ? found->data_ptr<float>() : nullptr;
  r.norm = norm.data_ptr<double>();
  r.coef = coef.data_ptr<double>();
  r.norm_out = out.data_ptr();
  r.norm_out_dtype = plan->result_dtype;
  if (scale) grads.bump_versions();
  plan->engine->norm_pass(*plan, r);
  if (scale) plan->engine->scale_pass(*plan, coef.const_data_ptr<double>(), false);
  auto wrap = [](at::Tensor t) {
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t)));
  };
  return py::make_tuple(wrap(std::move(out)), wrap(std::move(coef)), wrap(std::move(norm)));
}

// clip_grad_norm_ over `params`: (the norm as clip_grad_norm_ returns it, the fp64 factor, the
// fp64 norm), or None for the general path.
py::object clip_params(py::handle params, double max_norm, double norm_type, bool cuda_only,
                       py::handle inv_scale, py::handle found_inf, bool soft) {
  HANDLE_TH_ERRORS
  return run_params(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft, true);
  END_HANDLE_TH_ERRORS_PYBIND
}

// Pass 1 only: the same triple, or None for the general path. The gradients are not written (the
// factor goes to a fused optimizer instead).
py::object norm_params(py::handle params, double max_norm, double norm_type, bool cuda_only,
                       py::handle inv_scale, py::handle found_inf, bool soft) {
  HANDLE_TH_ERRORS
  return run_params(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft, false);
  END_HANDLE_TH_ERRORS_PYBIND
}

// clip_grad_value_ over `params` through the cached plan (one read and write of every element):
// True, or False to say "take the general path".
bool clamp_params(py::handle params, double clip_value, bool cuda_only) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "fusedclip.clip_grad_value_";
  TORCH_CHECK_VALUE(clip_value >= 0.0, op, ": clip_value must be >= 0, got ", clip_value);
  PlainGrads grads;
  if (!grads.collect(params, cuda_only)) return false;
  const auto plan = plan_for(grads.keys, grads.device, op);
  grads.bump_versions();
  plan->engine->clamp_pass(*plan, clip_value);
  return true;
  END_HANDLE_TH_ERRORS_PYBIND
}

// BackwardClipper's step in backward: one gradient's partial (m, s) into `out` (fp64 [1, 2] on its
// device, a row of the clipper's slots) through the cached one-tensor plan, without the
// dispatcher's cost. False: the gradient is not plain (the clipper takes the general path, which
// handles or refuses it).
bool partial_into(py::handle grad, double norm_type, py::handle out) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "fusedclip.BackwardClipper";
  TORCH_CHECK_TYPE(THPVariable_Check(grad.ptr()) && THPVariable_Check(out.ptr()), op,
                   ": grad and out must be tensors");
  const at::Tensor& g = THPVariable_Unpack(grad.ptr());
  const at::Tensor& o = THPVariable_Unpack(out.ptr());
  if (find_engine(g.device().type()) == nullptr ||
      !is_plain_grad(*g.unsafeGetTensorImpl(), g.device())) {
    return false;
  }
  TORCH_CHECK(o.scalar_type() == at::kDouble && o.numel() == 2 && o.is_contiguous() &&
                  o.device() == g.device(),
              op, ": out must be a contiguous float64 tensor of 2 elements on ", g.device());
  TORCH_CHECK_VALUE(norm_type > 0.0, op, ": norm_type must be > 0 or inf, got ", norm_type);
  const auto plan = plan_for({plain_key_of(*g.unsafeGetTensorImpl())}, g.device(), op);
  NormRequest r;
  r.p = norm_type;
  r.per_tensor_partial = o.data_ptr<double>();
  plan->engine->norm_pass(*plan, r);
  return true;
  END_HANDLE_TH_ERRORS_PYBIND
}

// The cached plan of the gradients of `params`, for kernels launched from Python (the Triton
// backend): (table, num_tensors, num_chunks, result dtype, [(dtype, aligned, chunk_lo,
// chunk_hi)]), or None for the general path. The table is ready for the current stream. With
// `writing`, the gradients' version counters are bumped (the caller is about to scale them).
py::object plan_of_params(py::handle params, bool cuda_only, bool writing, bool allow_half) {
  HANDLE_TH_ERRORS
  PlainGrads grads;
  if (!grads.collect(params, cuda_only, allow_half)) return py::none();
  const auto plan = plan_for(grads.keys, grads.device, "fusedclip.clip_grad_norm_");
  if (writing) grads.bump_versions();
  py::list groups;
  for (const Group& g : plan->groups) {
    groups.append(py::make_tuple(g.dtype, g.aligned, g.chunk_lo, g.chunk_hi));
  }
  return py::make_tuple(plan->table, static_cast<int64_t>(plan->keys.size()), plan->num_chunks,
                        plan->result_dtype, groups);
  END_HANDLE_TH_ERRORS_PYBIND
}

// The floor of the fast path's host cost, for the benchmark: a bare loop over `params` that only
// reads each .grad's data pointer (no checks, no plan). Returns their sum so nothing is elided.
int64_t grad_pointer_floor(py::handle params) {
  PyObject* list = params.ptr();
  TORCH_CHECK_TYPE(PyList_Check(list), "grad_pointer_floor: params must be a list");
  int64_t sum = 0;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    const at::Tensor& g =
        THPVariable_Unpack(PyList_GET_ITEM(list, i)).unsafeGetTensorImpl()->grad();
    if (g.defined()) sum += reinterpret_cast<int64_t>(g.const_data_ptr());
  }
  return sum;
}

}  // namespace
}  // namespace fusedclip

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedclip operators (registered as torch.ops.fusedclip) and the clip fast path";
  m.def("clip_params", &fusedclip::clip_params, py::arg("params"), py::arg("max_norm"),
        py::arg("norm_type"), py::arg("cuda_only") = true, py::arg("inv_scale") = py::none(),
        py::arg("found_inf") = py::none(), py::arg("soft") = false,
        "clip_grad_norm_ on a list of parameters through the cached plan (unscaling too, given "
        "inv_scale): (norm as returned, fp64 factor, fp64 norm), or None when the gradients need "
        "the general path");
  m.def("norm_params", &fusedclip::norm_params, py::arg("params"), py::arg("max_norm"),
        py::arg("norm_type"), py::arg("cuda_only") = true, py::arg("inv_scale") = py::none(),
        py::arg("found_inf") = py::none(), py::arg("soft") = false,
        "pass 1 only: (norm as returned, fp64 factor that would unscale and clip, fp64 norm), or "
        "None when the gradients need the general path");
  m.def("clamp_params", &fusedclip::clamp_params, py::arg("params"), py::arg("clip_value"),
        py::arg("cuda_only") = true,
        "clip_grad_value_ on a list of parameters through the cached plan: True, or False when "
        "the gradients need the general path");
  m.def("plan_of_params", &fusedclip::plan_of_params, py::arg("params"),
        py::arg("cuda_only") = true, py::arg("writing") = false, py::arg("allow_half") = true,
        "the cached plan of the gradients of a list of parameters (table, sizes, groups), or "
        "None when they need the general path");
  m.def("partial_into", &fusedclip::partial_into, py::arg("grad"), py::arg("norm_type"),
        py::arg("out"),
        "one gradient's partial (m, s) into out (fp64, 2 elements) through its cached plan: "
        "True, or False when the gradient needs the general path");
  m.attr("CHUNK_ELEMS") = fusedclip::kChunkElems;
  // The CUDA engine registers itself exactly when its sources are compiled in.
  m.attr("CUDA_KERNELS") = fusedclip::find_engine(c10::DeviceType::CUDA) != nullptr;
  m.def("cpu_capability", &fusedclip::cpu::capability,
        "the chunk-loop set the CPU engine runs: 'avx512', 'avx2' or 'baseline' (all compute the "
        "same bits)");
  m.def(
      "set_cpu_capability",
      [](const std::string& name) {
        TORCH_CHECK_VALUE(fusedclip::cpu::set_capability(name.c_str()),
                          "fusedclip: no chunk-loop set named '", name,
                          "' runs on this CPU and build (baseline; avx2 on an x86-64 CPU with "
                          "AVX2, FMA and F16C; avx512 on one with AVX-512 F, BW, VL and DQ too)");
      },
      py::arg("name"), "switch the CPU engine's chunk loops (tests and benchmarks)");
  {
    py::list names;
    for (const auto& v : fusedclip::kPass1Variants) names.append(v.name);
    m.attr("CUDA_PASS1_VARIANTS") = py::tuple(names);
  }
  m.def(
      "cuda_pass1_variant", [] { return std::string(fusedclip::pass1_variant_name()); },
      "the CUDA pass-1 kernel variant in use (FUSEDCLIP_CUDA_PASS1 at first use, default "
      "t512u4; csrc/engine/tuning.h)");
  m.def(
      "set_cuda_pass1_variant",
      [](const std::string& name) {
        TORCH_CHECK_VALUE(fusedclip::set_pass1_variant(name.c_str()),
                          "fusedclip: no CUDA pass-1 variant named '", name, "'; choose one of ",
                          fusedclip::pass1_variant_names());
      },
      py::arg("name"), "switch the CUDA pass-1 kernel variant (bench/variant_sweep.py)");
  m.def("grad_pointer_floor", &fusedclip::grad_pointer_floor, py::arg("params"),
        "benchmark floor of the fast path's host cost: a bare loop reading each .grad's data "
        "pointer");
  m.def("plans_built", &fusedclip::plans_built, "plans built since the process started");
  m.def("clear_plan_cache", &fusedclip::clear_plan_cache,
        "drop every cached plan that no captured CUDA graph uses");
}
