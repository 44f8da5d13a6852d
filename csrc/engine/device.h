// The engine of one device type: its passes over a plan's tensors and its plan hooks, in one
// struct that the device's own file defines and registers at load time (cpu/engine_cpu.cpp,
// cuda/engine_cuda.cpp). A plan holds the engine of its tensors' device, so the operators and the
// fast path run the same code for every device, and a build without a device's sources has no
// engine for it.
#pragma once

#include <cstdint>

#include <c10/core/Device.h>

namespace fusedclip {

struct Plan;
struct NormRequest;

struct DeviceEngine {
  const char* name;

  // Pass 1: one read of every element; partials per chunk, reduced in a fixed order into the
  // request's outputs (request.h). Deterministic, no host synchronization.
  void (*norm_pass)(const Plan& plan, const NormRequest& request);
  // Pass 2: every element times its coefficient (fp64, on the device), in place: *coef, or with
  // per_tensor coef[t] for the elements of tensor t. No writes to a chunk whose coefficient is 1.
  void (*scale_pass)(const Plan& plan, const double* coef, bool per_tensor);
  // Value clipping in one pass: every element clamped to [-bound, bound], bound = clip_value
  // rounded to the element's dtype (as torch converts a Python bound; inf past the dtype's range,
  // where torch raises); NaN stays NaN.
  void (*clamp_pass)(const Plan& plan, double clip_value);
  // The end of pass 1 on partials made earlier (fp64 [n, 2] on `device`, e.g. BackwardClipper's,
  // one per gradient): combined in row order as pass 1 combines its chunks', then the request's
  // totals written (norm, coef, norm_out, found_inf).
  void (*finish_pass)(const double* partials, int64_t n, const c10::Device& device,
                      const NormRequest& request);

  // Plan hooks, called with the plan cache's mutex held.
  // A plan was just built: plan.table is allocated on the device and plan.host_table holds its
  // values. The engine writes the table now, or sets up the state (Plan::device_state) that
  // make_ready keeps.
  void (*init_plan)(Plan& plan);
  // Before every use of the plan: make its table usable by kernels about to be queued on the
  // current stream, without a host synchronization. Sets Plan::pinned when a captured graph
  // will read the table.
  void (*make_ready)(Plan& plan);
};

// Registers the engine of `type` (once per type, from a static initializer of the device's file).
// Returns true, so that a namespace-scope constant can hold the call.
bool register_engine(c10::DeviceType type, const DeviceEngine& engine);

// The engine registered for `type`, or null when this build has none.
const DeviceEngine* find_engine(c10::DeviceType type);

// Why this build has no engine for `type`: one sentence, for error messages.
const char* no_engine_reason(c10::DeviceType type);

// The engine of `device`; throws, naming `op`, when this build has none.
const DeviceEngine& engine_for(const c10::Device& device, const char* op);

}  // namespace fusedclip
