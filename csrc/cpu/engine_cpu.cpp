// The CPU engine: the two passes and the value clamp over a plan's chunks, on torch's intra-op
// threads (at::parallel_for) with the vectorized chunk loops of cpu/kernels.h; its registration,
// and the operators' TORCH_LIBRARY_IMPL for CPU tensors.
//
// Work and reduction order depend only on the plan: each chunk's partial is computed by one
// thread, in the loops' fixed lane order, into its own slot, and the slots are combined in chunk
// order afterwards. So results are the same bits whatever the thread count (and whatever the
// instruction set: cpu/kernels.h).

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "engine/device.h"
#include "engine/dispatch.h"
#include "engine/norm_math.h"
#include "engine/ops_impl.h"
#include "engine/plan.h"
#include "engine/request.h"

namespace fusedclip {
namespace {

// The chunk loops cpu::kernels() chose, its refusal of a bad FUSEDCLIP_CPU_CAPABILITY made a
// ValueError: its std::invalid_argument reaches Python as a ValueError through the operators but
// as a RuntimeError through the one-call path (bindings.cpp), and the error should not depend on
// the path.
const cpu::CpuKernels& chunk_loops() {
  try {
    return cpu::kernels();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

// Below these many elements (the plan's total) a pass runs on the calling thread: handing half
// of it to the pool's other thread costs more than that half takes. Measured on this project's
// 2-core Zen 4 VM (torch's 2 OpenMP threads) with no threshold, through the public functions in
// the benchmark's protocol (gradients restored, then one call; median of 150 calls with 1 and 2
// threads interleaved; bf16 and fp32; two runs) on sets of many small tensors (sizes
// log-uniform in 1..16384, as small-500), 2 threads against 1:
// - norm (clip_grad_norm_ that does not clip) and norm + scale (one that clips): 0.83-0.98x at
//   8K-16K elements, 0.94-1.01x at 24K, 0.73-1.09x at 32K-48K (the runs disagree), 1.03-1.20x
//   at 64K, 1.07-1.39x at 96K-128K (one bf16 run: 0.86-0.91x);
// - clamp (clip_grad_value_, about half the norm's work per element): 0.82-1.01x at 64K,
//   0.99-1.07x at 96K, 0.92-1.12x at 128K, 1.03-1.14x at 192K.
// One tensor of 80K-128K elements (two chunks): 1.02-1.24x from 80K, with the split below.
// That is with the pool's thread awake, as in a training loop (and the benchmark). After 1 ms
// of idling, 2 threads took 20-40 us more than that, and after 10 ms 0.2 to 5 ms more on this VM:
// no size threshold pays for that without giving up what 2 threads gain on the benchmark's CPU
// sets (1.25-1.9x at 0.9M-5.3M elements).
constexpr int64_t kSerialElems = int64_t{1} << 16;       // the norm and scale passes
constexpr int64_t kSerialClampElems = int64_t{1} << 17;  // the clamp

int storage_index(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return cpu::kBF16;
    case at::kHalf: return cpu::kF16;
    case at::kFloat: return cpu::kF32;
    default: return cpu::kF64;
  }
}

// What the CPU engine keeps about a plan: the element count before each chunk's end (prefix
// sums), so that a pass can split the chunks between threads by elements, not by chunk count (a
// set of many small tensors and a few large ones would otherwise leave one thread most of it).
struct CpuPlanState : PlanDeviceState {
  std::vector<int64_t> elems_through;  // elems_through[c]: elements in chunks 0..c
};

const std::vector<int64_t>& elems_through(const Plan& plan) {
  return static_cast<const CpuPlanState&>(*plan.device_state).elems_through;
}

// f(chunk) for every chunk of the plan, spread over the intra-op threads in contiguous ranges of
// about equal element counts (the serial loop below serial_below elements in all).
template <typename F>
void for_each_chunk(const Plan& plan, int64_t serial_below, const F& f) {
  const std::vector<int64_t>& through = elems_through(plan);
  const int64_t total = through.empty() ? 0 : through.back();
  const int64_t parts =
      total < serial_below ? 1 : std::min<int64_t>(at::get_num_threads(), plan.num_chunks);
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) f(c);
  };
  if (parts <= 1) return run(0, plan.num_chunks);
  // Part i takes the chunks whose middle lies in its share of the elements. (By their ends, a
  // tensor of two chunks, 64K and 16K elements, went whole to the second part: the first chunk
  // ends past the middle of the total.)
  auto first_of = [&](int64_t part) {
    const int64_t twice_from = 2 * (total * part / parts);
    int64_t lo = 0, hi = plan.num_chunks;  // the first chunk whose start + end reaches twice_from
    while (lo < hi) {
      const int64_t c = (lo + hi) / 2;
      if ((c == 0 ? 0 : through[c - 1]) + through[c] < twice_from) {
        lo = c + 1;
      } else {
        hi = c;
      }
    }
    return lo;
  };
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t part = lo; part < hi; ++part) {
      run(part == 0 ? 0 : first_of(part), first_of(part + 1));
    }
  });
}

// The exact scalar loop of norm_math.h, for fp64 chunks (p = 1 or 2) whose largest magnitude is
// below 2^-960, which the vector loop (scaled_sum_f64 in chunk_loops.h) leaves to it.
Partial scalar_partial_f64(const double* data, int64_t n, double p, NormKind kind) {
  Partial acc{0.0, 0.0};
  for (int64_t k = 0; k < n; ++k) add_scaled(acc, std::abs(data[k]), p, kind);
  return acc;
}

// The (m, s) partial of one chunk.
Partial chunk_partial(const cpu::CpuKernels& k, at::ScalarType dtype, const void* base,
                      const ChunkSpan& span, double p, NormKind kind) {
  const int64_t n = span.end - span.begin;
  const int s = storage_index(dtype);
  const void* data = static_cast<const char*>(base) + span.begin * c10::elementSize(dtype);
  if (kind == NormKind::kInf) return {k.max_abs[s](data, n), 0.0};
  if (kind == NormKind::kGeneral) {
    // Two reads of the chunk (the second from cache): its maximum, then the sum of the ratios'
    // powers, so that (max, sum) is the partial.
    const double max = k.max_abs[s](data, n);
    if (max == 0.0 || is_nonfinite({max, 0.0})) return {max, 0.0};
    return {max, k.power_sum[s](data, n, p, max)};
  }
  const bool squares = kind == NormKind::kTwo;
  if (s != cpu::kF64) {
    return from_plain_sum(squares ? k.sum_squares[s](data, n) : k.sum_abs[s](data, n));
  }
  double scale = 0.0, sum = 0.0, max = 0.0;
  if (k.scaled_sum_f64[squares ? 0 : 1](data, n, &scale, &sum, &max)) return {scale, sum};
  if (max == 0.0 || is_nonfinite({max, 0.0})) return {max, 0.0};
  return scalar_partial_f64(static_cast<const double*>(data), n, p, kind);
}

// The norm in the returned dtype: fp64 as it is, the others rounded once to fp32 first (as the
// CUDA finish does).
template <typename T>
void store_as(void* dst, double v) {
  if constexpr (std::is_same_v<T, double>) {
    *static_cast<double*>(dst) = v;
  } else {
    *static_cast<T*>(dst) = static_cast<T>(static_cast<float>(v));
  }
}

// The request's totals from the combination of every partial (norm_math.h finish_total).
void write_totals(Partial total, NormKind kind, const NormRequest& r) {
  const double inv = r.inv_scale ? static_cast<double>(*r.inv_scale) : 1.0;
  const Finished f = finish_total(total, r.p, kind, r.max_norm, r.mode, inv);
  if (r.norm) *r.norm = f.norm;
  if (r.coef) *r.coef = f.coef;
  if (r.found_inf && f.nonfinite) *r.found_inf = 1.0f;
  if (r.norm_out) {
    FUSEDCLIP_DISPATCH_FLOATING(r.norm_out_dtype, "fusedclip::total_norm",
                                [&] { store_as<scalar_t>(r.norm_out, f.norm); });
  }
}

// Pass 1: one read of every element, a partial per chunk, combined in chunk order.
void norm_pass_cpu(const Plan& plan, const NormRequest& r) {
  const TableView table = plan.view();
  const NormKind kind = norm_kind(r.p);
  const cpu::CpuKernels& k = chunk_loops();
  std::vector<Partial> partials(table.num_chunks);
  for_each_chunk(plan, kSerialElems, [&](int64_t c) {
    const ChunkSpan span = table.span(c);
    partials[c] = chunk_partial(k, plan.keys[span.tensor].dtype,
                                table.data<const void>(span.tensor), span, r.p, kind);
  });
  if (r.wants_total()) {
    Partial total{0.0, 0.0};
    for (const Partial& part : partials) total = combine(total, part, r.p, kind);
    write_totals(total, kind, r);
  }
  if (r.wants_tensors()) {
    const double inv = r.inv_scale ? static_cast<double>(*r.inv_scale) : 1.0;
    for (int64_t t = 0; t < table.num_tensors; ++t) {
      Partial own{0.0, 0.0};
      const int64_t first = table.first_chunk[t];
      for (int64_t c = first; c < first + chunks_of(table.numel[t]); ++c) {
        own = combine(own, partials[c], r.p, kind);
      }
      write_tensor_outputs(r, t, own, kind, inv);
    }
  }
}

// The finish of pass 1 over given partials (fp64 [n, 2]), combined in row order as pass 1
// combines its chunks'.
void finish_pass_cpu(const double* partials, int64_t n, const at::Device&, const NormRequest& r) {
  const NormKind kind = norm_kind(r.p);
  Partial total{0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) total = combine(total, {partials[2 * i], partials[2 * i + 1]}, r.p, kind);
  write_totals(total, kind, r);
}

// Pass 2: every element of a chunk whose coefficient is not 1 read and written once.
void scale_pass_cpu(const Plan& plan, const double* coef, bool per_tensor) {
  const TableView table = plan.view();
  const cpu::CpuKernels& k = chunk_loops();
  if (!per_tensor && *coef == 1.0) return;  // nothing to write
  for_each_chunk(plan, kSerialElems, [&](int64_t chunk) {
    const ChunkSpan span = table.span(chunk);
    const double c = coef[per_tensor ? span.tensor : 0];
    if (c == 1.0) return;
    const at::ScalarType dtype = plan.keys[span.tensor].dtype;
    char* data = table.data<char>(span.tensor) + span.begin * c10::elementSize(dtype);
    k.scale[storage_index(dtype)](data, span.end - span.begin, c);
  });
}

// Value clipping in one read and write of every element. The bound is rounded to each tensor's
// dtype first, as torch rounds one the dtype can hold; one past its range (an fp16 bound past
// 65504) becomes inf, which clamps nothing, where torch raises.
void clamp_pass_cpu(const Plan& plan, double clip_value) {
  const TableView table = plan.view();
  const cpu::CpuKernels& k = chunk_loops();
  for_each_chunk(plan, kSerialClampElems, [&](int64_t chunk) {
    const ChunkSpan span = table.span(chunk);
    const at::ScalarType dtype = plan.keys[span.tensor].dtype;
    FUSEDCLIP_DISPATCH_FLOATING(dtype, "fusedclip::clamp_", [&] {
      const double bound = bound_as<scalar_t>(clip_value);
      scalar_t* data = table.data<scalar_t>(span.tensor);
      if (std::signbit(bound)) {
        // clip_value = -0.0: torch's clamp_min_(+0.0), then clamp_max_(-0.0), which the bit
        // compare of the vector loops cannot express; the scalar rule can.
        for (int64_t i = span.begin; i < span.end; ++i) data[i] = clamped<false>(data[i], bound);
        return;
      }
      k.clamp[storage_index(dtype)](data + span.begin, span.end - span.begin, bound);
    });
  });
}

// The table is host memory: written once, when the plan is built, and ready from then on; so are
// the chunks' element prefix sums.
void init_plan_cpu(Plan& plan) {
  std::copy(plan.host_table.begin(), plan.host_table.end(), plan.table.data_ptr<int64_t>());
  auto state = std::make_unique<CpuPlanState>();
  const TableView table = plan.view();
  state->elems_through.resize(plan.num_chunks);
  int64_t sum = 0;
  for (int64_t c = 0; c < plan.num_chunks; ++c) {
    const ChunkSpan span = table.span(c);
    sum += span.end - span.begin;
    state->elems_through[c] = sum;
  }
  plan.device_state = std::move(state);
}

void make_ready_cpu(Plan&) {}

const DeviceEngine kCpuEngine{"CPU",           &norm_pass_cpu,  &scale_pass_cpu, &clamp_pass_cpu,
                              &finish_pass_cpu, &init_plan_cpu, &make_ready_cpu};
[[maybe_unused]] const bool kRegistered = register_engine(c10::DeviceType::CPU, kCpuEngine);

}  // namespace
}  // namespace fusedclip

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) { fusedclip::register_ops(m); }
