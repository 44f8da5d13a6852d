// Pass 2 of the clip: rescale every gradient in place by a coefficient that lives on the device.
//
// One read and one write of each gradient when the coefficient is below 1; no memory traffic at
// all when it is exactly 1 (each block reads the coefficient and returns), which is the steady
// state of training once the norm sits under max_norm. The coefficient is read on the device, so
// the host never waits for pass 1.

#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "dispatch.h"
#include "multi_tensor_apply.cuh"

namespace fusedclip {
namespace {

// 16 bytes of T: one vector load or store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// The product is formed in fp64 (exact for fp16/bf16 inputs, one rounding for fp32) and rounded to
// T once through float, which is how torch converts fp64 to fp16/bf16 as well.
template <typename T>
__device__ __forceinline__ T scaled(T x, double c) {
  const double y = static_cast<double>(x) * c;
  if constexpr (std::is_same_v<T, double>) {
    return y;
  } else {
    return static_cast<T>(static_cast<float>(y));
  }
}

constexpr int kUnroll = 4;

// Scales elements [begin, end) of data. Vector path when the tensor's base is 16-byte aligned
// (then every chunk is, kChunkElems being a multiple of the pack size); scalar path otherwise and
// for the ragged tail of the last chunk.
template <typename T>
__device__ void scale_chunk(T* __restrict__ data, int64_t begin, int64_t end, double c) {
  using P = Pack<T>;
  int64_t i = begin;
  if (reinterpret_cast<uintptr_t>(data) % sizeof(P) == 0) {
    P* packs = reinterpret_cast<P*>(data + begin);
    const int64_t n_packs = (end - begin) / P::kSize;
    // kUnroll independent loads in flight per thread before any store.
    for (int64_t base = threadIdx.x; base < n_packs; base += kUnroll * kBlockThreads) {
      P r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + u * kBlockThreads;
        if (k < n_packs) r[u] = packs[k];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + u * kBlockThreads;
        if (k < n_packs) {
#pragma unroll
          for (int e = 0; e < P::kSize; ++e) r[u].v[e] = scaled(r[u].v[e], c);
          packs[k] = r[u];
        }
      }
    }
    i = begin + n_packs * P::kSize;
  }
  for (int64_t k = i + threadIdx.x; k < end; k += kBlockThreads) data[k] = scaled(data[k], c);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    scale_kernel(const ChunkTable table, const double* __restrict__ coef) {
  const double c = *coef;
  if (c == 1.0) return;  // nothing to write
  const int64_t total = table.total_chunks();
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    const int t = table.tensor_of(chunk);
    const int64_t begin = (chunk - table.chunk_begin[t]) * kChunkElems;
    const int64_t end = begin + kChunkElems < table.numel[t] ? begin + kChunkElems : table.numel[t];
    scale_chunk(static_cast<T*>(table.data[t]), begin, end, c);
  }
}

void scale_cuda(at::TensorList tensors, const at::Tensor& coef) {
  check_scale_args(tensors, coef);
  const c10::cuda::CUDAGuard guard(coef.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double* coef_ptr = coef.data_ptr<double>();

  // Dense tensors (checked above) are scaled as flat arrays, one launch sequence per dtype.
  std::vector<at::Tensor> by_dtype[4];
  const at::ScalarType dtypes[4] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    for (int d = 0; d < 4; ++d) {
      if (t.scalar_type() == dtypes[d]) by_dtype[d].push_back(t);
    }
  }
  for (int d = 0; d < 4; ++d) {
    if (by_dtype[d].empty()) continue;
    FUSEDCLIP_DISPATCH_FLOATING(dtypes[d], "fusedclip::scale_", [&] {
      for_each_table(by_dtype[d], [&](const ChunkTable& table, int grid) {
        scale_kernel<scalar_t><<<grid, kBlockThreads, 0, stream>>>(table, coef_ptr);
      });
    });
  }
}

}  // namespace
}  // namespace fusedclip

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) { m.impl("scale_", &fusedclip::scale_cuda); }
