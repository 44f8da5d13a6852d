// Pass 2 of the clip: rescale every tensor of a plan in place by a coefficient on the device; and
// value clipping, the other in-place pass of one read and one write.
//
// One read and one write of each element when the coefficient is below 1; no memory traffic at all
// when it is exactly 1 (each block reads the coefficient and returns), which is the steady state
// of training once the norm sits under max_norm: the whole clip then costs pass 1's single read.
// The coefficient is read on the device, so the host never waits for pass 1.

#include <algorithm>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/chunk_io.cuh"
#include "cuda/passes_cuda.h"
#include "engine/dispatch.h"
#include "engine/norm_math.h"

namespace fusedclip {
namespace {

// Pass 2 (see the top of this file). coef_stride 0: one coefficient for every tensor, and the whole
// launch returns at once when it is 1; coef_stride 1: per-tensor clipping, coef[t] for tensor t,
// and a chunk whose tensor's coefficient is 1 is skipped.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    scale_kernel(const TableView table, int64_t chunk_lo, int64_t chunk_hi,
                 const double* __restrict__ coef, int64_t coef_stride) {
  if (coef_stride == 0 && *coef == 1.0) return;  // nothing to write
  for (int64_t chunk = chunk_lo + blockIdx.x; chunk < chunk_hi; chunk += gridDim.x) {
    const ChunkSpan span = table.span(chunk);
    const double c = coef[span.tensor * coef_stride];
    if (c == 1.0) continue;
    update_chunk(table.data<T>(span.tensor), span.begin, span.end,
                 [c](T x) { return scaled(x, c); });
  }
}

// Value clipping: every element clamped to [-bound, bound] in one read and one write (torch's
// foreach path makes two: clamp_min, then clamp_max), bitwise as torch's CUDA foreach kernels
// (clamped<true>). bound is exact in T (bound_as).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    clamp_kernel(const TableView table, int64_t chunk_lo, int64_t chunk_hi, double bound) {
  for (int64_t chunk = chunk_lo + blockIdx.x; chunk < chunk_hi; chunk += gridDim.x) {
    const ChunkSpan span = table.span(chunk);
    update_chunk(table.data<T>(span.tensor), span.begin, span.end,
                 [bound](T x) { return clamped<true>(x, bound); });
  }
}

// The table in slices of kSlice values, each slice an argument of one launch (4 KiB: under every
// architecture's parameter limit). Only when a plan is built.
constexpr int kSlice = 500;
struct Slice {
  int64_t v[kSlice];
};

__global__ void upload_kernel(int64_t* __restrict__ dst, const Slice slice, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = slice.v[i];
}

}  // namespace

void scale_pass_cuda(const Plan& plan, const double* coef, bool per_tensor) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const int device = plan.device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const TableView table = plan.view();
  for (const Group& g : plan.groups) {
    FUSEDCLIP_DISPATCH_FLOATING(g.dtype, "fusedclip::scale_", [&] {
      const int grid = grid_for_chunks<scale_kernel<scalar_t>>(device, g.chunk_hi - g.chunk_lo);
      scale_kernel<scalar_t><<<grid, kBlockThreads, 0, stream>>>(table, g.chunk_lo, g.chunk_hi,
                                                                  coef, per_tensor ? 1 : 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void clamp_pass_cuda(const Plan& plan, double clip_value) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const int device = plan.device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const TableView table = plan.view();
  for (const Group& g : plan.groups) {
    FUSEDCLIP_DISPATCH_FLOATING(g.dtype, "fusedclip::clamp_", [&] {
      const int grid = grid_for_chunks<clamp_kernel<scalar_t>>(device, g.chunk_hi - g.chunk_lo);
      clamp_kernel<scalar_t><<<grid, kBlockThreads, 0, stream>>>(
          table, g.chunk_lo, g.chunk_hi, bound_as<scalar_t>(clip_value));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

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
