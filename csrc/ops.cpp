// The operator schemas of the fusedclip namespace (torch.ops.fusedclip), declared once. Each
// device registers their implementations (engine/ops_impl.cpp) under its own dispatch key, in its
// own file: cpu/engine_cpu.cpp, cuda/engine_cuda.cpp.

#include <torch/library.h>

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
  // soft: the coefficient is max_norm / (norm + max_norm) instead.
  m.def("total_norm(Tensor[] tensors, float norm_type, float max_norm, bool per_tensor, "
        "Tensor? inv_scale=None, Tensor(a!)? found_inf=None, bool soft=False) -> "
        "(Tensor, Tensor, Tensor)");
  // Pass 1 without its finish: each tensor's own partial (m, s) of its raw elements (norm_math.h)
  // written into row t of out (fp64 [T, 2], contiguous, on the tensors' device; e.g. rows of
  // BackwardClipper's slots). One read of every element.
  m.def("partials_(Tensor[] tensors, float norm_type, Tensor(a!) out) -> ()");
  // Pass 1's finish over partials made earlier (fp64 [N, 2]), combined in row order: (norm, coef)
  // as total_norm returns them, with inv_scale, found_inf and soft as there.
  m.def("finish_partials(Tensor partials, float norm_type, float max_norm, "
        "Tensor? inv_scale=None, Tensor(a!)? found_inf=None, bool soft=False) -> (Tensor, Tensor)");
  // Both passes: global-norm clipping in place (unscaling too, given inv_scale); returns
  // (norm, per-tensor norms) as total_norm.
  m.def("clip_(Tensor(a!)[] tensors, float max_norm, float norm_type, bool per_tensor, "
        "Tensor? inv_scale=None, Tensor(b!)? found_inf=None, bool soft=False) -> (Tensor, Tensor)");
  // Per-tensor clipping in the same two passes: tensor t is scaled by its own coefficient from
  // its own norm and max_norms[t] (fp64, one per tensor, on the tensors' device); returns the
  // per-tensor norms before clipping (fp64).
  m.def("clip_per_tensor_(Tensor(a!)[] tensors, Tensor max_norms, float norm_type, bool soft) -> "
        "Tensor");
  // Value clipping in one read and one write: every element clamped to [-clip_value,
  // clip_value] (the bound rounded to each tensor's dtype, as torch rounds it; NaN stays NaN).
  m.def("clamp_(Tensor(a!)[] tensors, float clip_value) -> ()");
  // Adaptive gradient clipping (NFNets; timm's adaptive_clip_grad): each unit of a gradient (a
  // row, or the whole tensor below two dims) is scaled to at most clip_factor * max(the norm of
  // the parameter's unit, eps). grads[i] and params[i]: same shape, contiguous.
  m.def("adaptive_clip_(Tensor(a!)[] grads, Tensor[] params, float clip_factor, float eps, "
        "float norm_type) -> ()");
}
