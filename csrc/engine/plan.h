// Plans: the tensor table of a list of tensors on their device, built once and reused.
//
// Building a plan lays the tensors out as chunks (table.h), groups the chunks by dtype and
// 16-byte alignment and checks that no two tensors share memory. Nothing here depends on the
// device: getting the table onto it is the device engine's part (device.h; on CUDA through the
// arguments of a few small kernel launches, so a plan can also be built while a CUDA graph is
// being captured). A plan is keyed by what its table holds (address, size and dtype of every
// tensor): it stays valid exactly as long as the gradient storages are unchanged, and a gradient
// that was reallocated, resized or set to None changes the key and gets a new plan.
//
// A plan holds no per-call state: pass 1's workspace comes from the caching allocator on every
// call (stream- and graph-aware), so calls on different streams or concurrent graph replays never
// share one.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "engine/device.h"
#include "engine/table.h"

namespace fusedclip {

// What the table records about one tensor (the address of an empty tensor is never read and is
// recorded as 0, so a reallocated empty gradient keeps its plan).
struct TensorKey {
  int64_t addr;
  int64_t numel;
  at::ScalarType dtype;

  bool operator==(const TensorKey& o) const {
    return addr == o.addr && numel == o.numel && dtype == o.dtype;
  }
};

// The chunks [chunk_lo, chunk_hi) of one dtype whose tensors all are (or all are not) 16-byte
// aligned: one launch per pass.
struct Group {
  at::ScalarType dtype;
  bool aligned;
  int64_t chunk_lo;
  int64_t chunk_hi;
};

// What a device's engine keeps about one plan besides the table (CUDA: where the device copy of
// the table stands). Created by the engine's init_plan, destroyed with the plan.
struct PlanDeviceState {
  virtual ~PlanDeviceState() = default;
};

struct Plan {
  at::Device device{at::kCPU};
  const DeviceEngine* engine = nullptr;  // the engine of `device`: its passes run this plan
  std::vector<TensorKey> keys;
  std::vector<Group> groups;
  int64_t num_chunks = 0;
  // The returned norm's dtype: the tensors' dtypes promoted together and with float32, so that
  // it holds the fp64 norm to 1e-5 (a bf16 one would round 82.83 to 83.0).
  at::ScalarType result_dtype = at::kFloat;
  std::vector<int64_t> host_table;           // 3 * T + C values (table.h)
  at::Tensor table;                          // the same on `device`

  // The engine's state of this plan, and whether a captured graph reads its table (then the plan
  // is never evicted). Both set by the engine's hooks, guarded by the plan cache's mutex.
  std::unique_ptr<PlanDeviceState> device_state;
  bool pinned = false;
  // Whether the tensors are known not to share memory (check_disjoint passed): every plan that
  // writes is; one built to read parameters only (adaptive clipping's) may not be.
  bool disjoint = false;

  TableView view() const {
    return table_view(table.const_data_ptr<int64_t>(), static_cast<int64_t>(keys.size()),
                      num_chunks);
  }
};

// Checks a tensor the fused kernels can take as it is: strided, dense (contiguous or permuted,
// no gaps, no overlap), a kernel dtype, on `device` (a device this build has an engine for).
// Throws naming it.
void check_plain(const at::Tensor& t, const at::Device& device, const char* op, size_t index);

// The key of a tensor that passed check_plain.
TensorKey key_of(const at::Tensor& t);

// The plan for these keys (taken from tensors on `device`), cached or new, with its table ready
// for kernels on the current stream (the engine's make_ready). Throws, touching nothing, when
// this build has no engine for `device`, or when two tensors share memory and the plan's tensors
// may be `written` (a plan only read, like adaptive clipping's parameters', may overlap).
std::shared_ptr<Plan> plan_for(const std::vector<TensorKey>& keys, at::Device device,
                               const char* op, bool written = true);

// Throws a ValueError naming two of the tensors when their memory ranges overlap.
void check_disjoint(const std::vector<TensorKey>& keys);

// check_plain on every tensor, then plan_for. `tensors` must not be empty.
std::shared_ptr<Plan> plan_for(at::TensorList tensors, const char* op);

// Drops every cached plan that no captured CUDA graph reads (tests; freeing memory).
void clear_plan_cache();
// Number of plans built since the process started (tests of reuse and invalidation).
int64_t plans_built();

}  // namespace fusedclip
