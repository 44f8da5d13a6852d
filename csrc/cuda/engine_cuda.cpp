// The CUDA engine: the plan hooks that get a plan's table onto the GPU for the stream (or the
// graph capture) about to use it, without a host synchronization (the upload kernel itself is in
// table_upload.cu); the engine's registration; and the operators' TORCH_LIBRARY_IMPL for CUDA
// tensors. The passes are in norm_kernels.cu, scale_kernels.cu and clamp_kernels.cu.

#include <cstdint>
#include <memory>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "cuda/passes_cuda.h"
#include "engine/device.h"
#include "engine/ops_impl.h"
#include "engine/plan.h"

namespace fusedclip {
namespace {

// Where the device copy of a plan's table stands (guarded by the plan cache's mutex).
// upload_capture: 0 when it was uploaded eagerly on upload_stream (then upload_done marks its
// completion), else the id of the capture that recorded the upload: until that graph replays,
// the memory holds nothing, and any other user must upload again.
struct CudaTableState final : PlanDeviceState {
  uint64_t upload_capture = 0;
  void* upload_stream = nullptr;
  void* upload_done = nullptr;  // cudaEvent_t

  ~CudaTableState() override {
    if (upload_done != nullptr) {
      // Destroying an event with work pending is allowed: it is released once that completes.
      (void)cudaEventDestroy(static_cast<cudaEvent_t>(upload_done));
    }
  }
};

// The id of the capture the current stream is in, or 0.
uint64_t capture_id(const at::Device& device) {
  cudaStreamCaptureStatus status;
  unsigned long long id = 0;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(c10::cuda::getCurrentCUDAStream(device.index()),
                                          &status, &id));
  return status == cudaStreamCaptureStatusActive ? static_cast<uint64_t>(id) : 0;
}

// Nothing is uploaded yet: the stream (or the capture) that first uses the plan does it.
void init_plan_cuda(Plan& plan) { plan.device_state = std::make_unique<CudaTableState>(); }

// Makes the device copy of the table usable by kernels about to be queued on the current stream,
// without a host synchronization.
void make_ready_cuda(Plan& plan) {
  auto& state = static_cast<CudaTableState&>(*plan.device_state);
  const c10::cuda::CUDAGuard guard(plan.device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(plan.device.index());
  const uint64_t capture = capture_id(plan.device);
  const bool uploaded = state.upload_stream != nullptr;
  if (capture != 0) {
    plan.pinned = true;
    // An upload recorded by this capture runs first at every replay.
    if (uploaded && state.upload_capture == capture) return;
    if (uploaded && state.upload_capture == 0) {
      // An eager upload, on any stream, maybe not finished: torch.cuda.graph synchronizes the
      // device before it captures, but a raw capture_begin need not, and a replay could then read
      // the table before the upload kernels ran. The graph waits for the upload's event (an
      // external event node: allowed on an event recorded outside the capture; at replay the
      // upload is long done and the wait costs nothing).
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(),
                                         static_cast<cudaEvent_t>(state.upload_done),
                                         cudaEventWaitExternal));
      return;
    }
    upload_table_cuda(plan.table.data_ptr<int64_t>(), plan.host_table.data(),
                      static_cast<int64_t>(plan.host_table.size()));
    state.upload_capture = capture;
    state.upload_stream = stream.stream();
    return;
  }
  if (!uploaded || state.upload_capture != 0) {
    upload_table_cuda(plan.table.data_ptr<int64_t>(), plan.host_table.data(),
                      static_cast<int64_t>(plan.host_table.size()));
    if (state.upload_done == nullptr) {
      cudaEvent_t event;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
      state.upload_done = event;
    }
    C10_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(state.upload_done), stream.stream()));
    state.upload_capture = 0;
    state.upload_stream = stream.stream();
    return;
  }
  if (state.upload_stream != stream.stream()) {
    // Another stream uploaded it: wait for that on the device, and keep the table's memory
    // from being reused before this stream's kernels are done with it.
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(),
                                       static_cast<cudaEvent_t>(state.upload_done), 0));
    c10::cuda::CUDACachingAllocator::recordStream(plan.table.storage().data_ptr(), stream);
  }
}

const DeviceEngine kCudaEngine{"CUDA",           &norm_pass_cuda,  &scale_pass_cuda, &clamp_pass_cuda,
                               &finish_pass_cuda, &init_plan_cuda, &make_ready_cuda};
[[maybe_unused]] const bool kRegistered = register_engine(c10::DeviceType::CUDA, kCudaEngine);

}  // namespace
}  // namespace fusedclip

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) { fusedclip::register_ops(m); }
