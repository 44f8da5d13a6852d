// Plans: the device-side tensor table of a list of tensors, built once and reused.
//
// Building a plan lays the tensors out as chunks (table.h), groups the chunks by dtype, checks
// that no two tensors share memory, and uploads the table through kernel arguments of a few
// kernel launches (so a plan can be built while a CUDA graph is captured). It also owns the
// workspace of pass 1: one (m, s) partial per chunk and the counter that elects the last block. A plan is keyed by what the table holds (address, size and dtype of every
// tensor), so it stays valid exactly as long as the gradient storages are unchanged; a gradient
// that was reallocated, resized or set to None changes the key and gets a new plan.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "table.h"

namespace fusedclip {

// What the table records about one tensor.
struct TensorKey {
  int64_t addr;
  int64_t numel;
  at::ScalarType dtype;

  bool operator==(const TensorKey& o) const {
    return addr == o.addr && numel == o.numel && dtype == o.dtype;
  }
};

// The chunks [chunk_lo, chunk_hi) of one dtype: one launch per pass.
struct Group {
  at::ScalarType dtype;
  int64_t chunk_lo;
  int64_t chunk_hi;
};

struct Plan {
  at::Device device{at::kCPU};
  std::vector<TensorKey> keys;
  std::vector<Group> groups;
  int64_t num_chunks = 0;
  at::ScalarType result_dtype = at::kFloat;  // the dtypes promoted together, as torch's norm
  at::Tensor table;       // int64 [3 * T + C] on `device` (table.h)
  at::Tensor partials;    // fp64 [2 * max(num_chunks, 1)]: (m, s) per chunk
  at::Tensor counter;     // int32 [1]: blocks of pass 1 finished; the last one resets it to 0
  bool used_in_capture = false;  // referenced by a CUDA graph: never evicted

  TableView view() const {
    return table_view(table.const_data_ptr<int64_t>(), static_cast<int64_t>(keys.size()),
                      num_chunks);
  }
};

// Checks a tensor the fused kernels can take as it is: strided, dense (contiguous or permuted,
// no gaps, no overlap), a kernel dtype, on `device`. Throws with `what` naming the tensor.
void check_plain(const at::Tensor& t, const at::Device& device, const char* op, size_t index);

// The key of a tensor that passed check_plain.
TensorKey key_of(const at::Tensor& t);

// The cached plan for these keys (the tensors they were taken from, all on `device`), or a new
// one. Throws, touching nothing, when two tensors share memory.
std::shared_ptr<Plan> plan_for(const std::vector<TensorKey>& keys, at::Device device,
                               const char* op);

// check_plain on every tensor, then plan_for. `tensors` must not be empty.
std::shared_ptr<Plan> plan_for(at::TensorList tensors, const char* op);

// Drops every cached plan not held by a CUDA graph (tests; freeing memory).
void clear_plan_cache();
// Number of plans built since the process started (tests of reuse and invalidation).
int64_t plans_built();

}  // namespace fusedclip
