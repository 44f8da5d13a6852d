// The operators' implementations (ops_impl.cpp), registered by each device's file for its
// dispatch key: TORCH_LIBRARY_IMPL(fusedclip, <Device>, m) { register_ops(m); }. They are the
// same for every device: each runs on the engine of its tensors' device (Plan::engine).
#pragma once

#include <torch/library.h>

namespace fusedclip {

// m.impl of every operator declared in ops.cpp.
void register_ops(torch::Library& m);

}  // namespace fusedclip
