// What the CUDA files share: the passes (norm_kernels.cu, scale_kernels.cu, clamp_kernels.cu),
// which engine_cuda.cpp puts into the CUDA engine, and the table upload (table_upload.cu) its
// make_ready calls. All launch on the current stream, check every launch and never synchronize
// the host.
#pragma once

#include <cstdint>

#include <c10/core/Device.h>

namespace fusedclip {

struct Plan;         // engine/plan.h
struct NormRequest;  // engine/request.h

// DeviceEngine::norm_pass, scale_pass, clamp_pass and finish_pass (engine/device.h) on CUDA.
void norm_pass_cuda(const Plan& plan, const NormRequest& request);
void finish_pass_cuda(const double* partials, int64_t n, const c10::Device& device,
                      const NormRequest& request);
void scale_pass_cuda(const Plan& plan, const double* coef, bool per_tensor);
void clamp_pass_cuda(const Plan& plan, double clip_value);

// Copies n int64 values from host memory to dst (device memory of the current device) through
// kernel arguments, on the current stream; capturable.
void upload_table_cuda(int64_t* dst, const int64_t* src, int64_t n);

}  // namespace fusedclip
