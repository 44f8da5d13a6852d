// The CPU engine: the two passes and the value clamp on the CPU, with the same table, chunks and
// accumulation rules as the CUDA kernels (norm_math.h), one thread, chunk after chunk; its
// registration, and the operators' TORCH_LIBRARY_IMPL for CPU tensors. Built with any torch, this
// is how the operators run on CPU tensors and how every machine tests the plan, the table layout
// and the reduction rules.

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include "engine/device.h"
#include "engine/dispatch.h"
#include "engine/norm_math.h"
#include "engine/ops_impl.h"
#include "engine/plan.h"
#include "engine/request.h"

namespace fusedclip {
namespace {

template <typename T>
Partial chunk_partial(const T* data, int64_t begin, int64_t end, double p, NormKind kind) {
  using M = math_t<T>;
  if (kind == NormKind::kInf) {
    M m = 0;
    for (int64_t k = begin; k < end; ++k) m = max_magnitude(m, std::abs(static_cast<M>(data[k])));
    return {static_cast<double>(m), 0.0};
  }
  if (std::is_same_v<T, double> || kind == NormKind::kGeneral) {
    Partial acc{0.0, 0.0};
    for (int64_t k = begin; k < end; ++k) add_scaled(acc, std::abs(static_cast<double>(data[k])), p, kind);
    return acc;
  }
  double s = 0.0;
  for (int64_t k = begin; k < end; ++k) {
    const double a = std::abs(static_cast<double>(static_cast<float>(data[k])));
    s += kind == NormKind::kTwo ? a * a : a;
  }
  return from_plain_sum(s);
}

template <typename T>
void store_as(void* dst, double v) {
  *static_cast<T*>(dst) = static_cast<T>(static_cast<float>(v));
}

void norm_pass_cpu(const Plan& plan, const NormRequest& r) {
  const TableView table = plan.view();
  const NormKind kind = norm_kind(r.p);
  std::vector<Partial> partials(table.num_chunks);
  for (const Group& g : plan.groups) {
    FUSEDCLIP_DISPATCH_FLOATING(g.dtype, "fusedclip::total_norm", [&] {
      for (int64_t c = g.chunk_lo; c < g.chunk_hi; ++c) {
        const ChunkSpan span = table.span(c);
        partials[c] = chunk_partial(table.data<const scalar_t>(span.tensor), span.begin, span.end,
                                    r.p, kind);
      }
    });
  }
  Partial total{0.0, 0.0};
  if (r.wants_total()) {
    for (const Partial& part : partials) total = combine(total, part, r.p, kind);
  }
  const double inv = r.inv_scale ? static_cast<double>(*r.inv_scale) : 1.0;
  const Finished f = finish_total(total, r.p, kind, r.max_norm, r.mode, inv);
  const double norm = f.norm;
  if (r.norm) *r.norm = norm;
  if (r.coef) *r.coef = f.coef;
  if (r.found_inf && f.nonfinite) *r.found_inf = 1.0f;
  if (r.norm_out) {
    FUSEDCLIP_DISPATCH_FLOATING(r.norm_out_dtype, "fusedclip::total_norm",
                                [&] { store_as<scalar_t>(r.norm_out, norm); });
  }
  if (r.per_tensor || r.per_tensor_coef) {
    for (int64_t t = 0; t < table.num_tensors; ++t) {
      Partial own{0.0, 0.0};
      const int64_t first = table.first_chunk[t];
      for (int64_t c = first; c < first + chunks_of(table.numel[t]); ++c) {
        own = combine(own, partials[c], r.p, kind);
      }
      write_tensor_outputs(r, t, finish_norm(own, r.p, kind) * inv, inv);
    }
  }
}

void scale_pass_cpu(const Plan& plan, const double* coef, bool per_tensor) {
  const TableView table = plan.view();
  for (const Group& g : plan.groups) {
    FUSEDCLIP_DISPATCH_FLOATING(g.dtype, "fusedclip::scale_", [&] {
      for (int64_t chunk = g.chunk_lo; chunk < g.chunk_hi; ++chunk) {
        const ChunkSpan span = table.span(chunk);
        const double c = coef[per_tensor ? span.tensor : 0];
        if (c == 1.0) continue;  // nothing to write
        scalar_t* data = table.data<scalar_t>(span.tensor);
        for (int64_t k = span.begin; k < span.end; ++k) data[k] = scaled(data[k], c);
      }
    });
  }
}

// Tensors from this many elements are clamped by torch's own CPU kernel (vectorized, on its
// intra-op threads): its result is clamped<false>'s bit for bit, and past a few thousand elements
// it beats the scalar loop below by more than its call costs.
constexpr int64_t kTorchClampElems = 16384;

// One read and one write of every element, tensor by tensor. The bound is rounded to the tensor's
// dtype first (an fp16 bound past 65504 becomes inf, which clamps nothing), as the CUDA kernel does.
void clamp_pass_cpu(const Plan& plan, double clip_value) {
  const TableView table = plan.view();
  for (int64_t t = 0; t < table.num_tensors; ++t) {
    const int64_t n = table.numel[t];
    if (n == 0) continue;
    FUSEDCLIP_DISPATCH_FLOATING(plan.keys[t].dtype, "fusedclip::clamp_", [&] {
      const double bound = bound_as<scalar_t>(clip_value);
      scalar_t* data = table.data<scalar_t>(t);
      if (n >= kTorchClampElems) {
        at::from_blob(data, {n}, at::TensorOptions().dtype(plan.keys[t].dtype))
            .clamp_(-bound, bound);
        return;
      }
      for (int64_t k = 0; k < n; ++k) data[k] = clamped<false>(data[k], bound);
    });
  }
}

// The table is host memory: written once, when the plan is built, and ready from then on.
void init_plan_cpu(Plan& plan) {
  std::copy(plan.host_table.begin(), plan.host_table.end(), plan.table.data_ptr<int64_t>());
}

void make_ready_cpu(Plan&) {}

const DeviceEngine kCpuEngine{"CPU", &norm_pass_cpu, &scale_pass_cpu, &clamp_pass_cpu,
                              &init_plan_cpu, &make_ready_cpu};
[[maybe_unused]] const bool kRegistered = register_engine(c10::DeviceType::CPU, kCpuEngine);

}  // namespace
}  // namespace fusedclip

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) { fusedclip::register_ops(m); }
