// Getting a plan's table onto the GPU: its values travel as kernel arguments, so the upload
// needs no pinned host buffer and no memcpy, and can be recorded in a CUDA graph capture. Called
// by the CUDA engine's make_ready (engine_cuda.cpp), on the stream that is about to use the plan.

#include <algorithm>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/passes_cuda.h"

namespace fusedclip {
namespace {

// The table in slices of kSlice values, each slice an argument of one launch (4 KiB: under every
// architecture's parameter limit). Only when make_ready finds no usable copy (a new plan, or one
// whose upload a capture recorded).
constexpr int kSlice = 500;
struct Slice {
  int64_t v[kSlice];
};

__global__ void upload_kernel(int64_t* __restrict__ dst, const Slice slice, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = slice.v[i];
}

}  // namespace

void upload_table_cuda(int64_t* dst, const int64_t* src, int64_t n) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t begin = 0; begin < n; begin += kSlice) {
    const int count = static_cast<int>(std::min<int64_t>(kSlice, n - begin));
    Slice slice;
    std::copy(src + begin, src + begin + count, slice.v);
    upload_kernel<<<1, 128, 0, stream>>>(dst + begin, slice, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fusedclip
