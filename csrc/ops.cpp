// Operator schemas of the fusedclip namespace, their CPU implementations, and the Python module
// stub that lets `import fusedclip._C` load this library (which registers everything below).
//
// Each CUDA implementation registers itself next to its kernels (TORCH_LIBRARY_IMPL(fusedclip,
// CUDA, m) in the family's .cu file); fake implementations for torch.compile live in
// fusedclip/ops.py.

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

extern "C" {
// `import fusedclip._C` needs a module; the operators need only the library to be loaded.
PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fusedclip operators, registered as torch.ops.fusedclip", -1,
                               nullptr};
  return PyModule_Create(&module);
}
}

namespace fusedclip {
namespace {

// CPU scale_: each tensor is widened to fp64, multiplied, and rounded back once, the same
// arithmetic as the CUDA kernel, and likewise nothing is written when coef is exactly 1. Reading
// coef is a plain host read on the CPU.
void scale_cpu(at::TensorList tensors, const at::Tensor& coef) {
  check_scale_args(tensors, coef);
  const double c = coef.item<double>();
  if (c == 1.0) return;
  for (const at::Tensor& t : tensors) {
    t.copy_(t.to(at::kDouble).mul_(c));
  }
}

}  // namespace
}  // namespace fusedclip

TORCH_LIBRARY(fusedclip, m) {
  // t <- t * coef for every tensor, in place; coef is a one-element fp64 tensor on the tensors'
  // device. Writes nothing when coef is exactly 1. The rescale pass of the fused clip.
  m.def("scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
}

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) { m.impl("scale_", &fusedclip::scale_cpu); }
