// Pass 2 of the clip: rescale every tensor of a plan in place by a coefficient on the device.
//
// One read and one write of each element when the coefficient is below 1; no memory traffic at all
// when it is exactly 1 (each block reads the coefficient and returns), which is the steady state
// of training once the norm sits under max_norm: the whole clip then costs pass 1's single read.
// The coefficient is read on the device, so the host never waits for pass 1.

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

}  // namespace fusedclip
