// Value clipping (clip_grad_value_): every element of a plan's tensors clamped to [-bound, bound]
// in place, in one read and one write, with the same chunk walk as pass 2 (chunk_io.cuh).

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/chunk_io.cuh"
#include "cuda/launch.cuh"
#include "cuda/passes_cuda.h"
#include "engine/dispatch.h"
#include "engine/norm_math.h"
#include "engine/plan.h"

namespace fusedclip {
namespace {

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

}  // namespace

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

}  // namespace fusedclip
