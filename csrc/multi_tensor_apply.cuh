// Multi-tensor launches: one kernel covers many tensors, split into fixed-size chunks.
//
// The tensor table travels as a kernel argument (by value, under the 4 KiB parameter limit), so a
// launch needs no device allocation and no host-to-device copy and can be captured in a CUDA graph.
// Tensors beyond one table's capacity go to further launches of the same kernel. Each block walks
// the chunks blockIdx.x, blockIdx.x + gridDim.x, ... and finds a chunk's tensor by binary search in
// the table's chunk offsets.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace fusedclip {

// Elements per chunk: a multiple of every vector width, so a chunk starts as aligned as its tensor.
constexpr int64_t kChunkElems = 1 << 16;
constexpr int kBlockThreads = 512;
constexpr int kBlocksPerSm = 4;
// 3 * 8 * 112 + 8 + 4 = 2700 bytes: well inside the kernel parameter limit.
constexpr int kTableCapacity = 112;

struct ChunkTable {
  void* data[kTableCapacity];
  int64_t numel[kTableCapacity];
  // Tensor i owns the chunks [chunk_begin[i], chunk_begin[i + 1]); chunk_begin[count] is the total.
  int64_t chunk_begin[kTableCapacity + 1];
  int count;

  __device__ __forceinline__ int64_t total_chunks() const { return chunk_begin[count]; }

  // The tensor that owns `chunk` (chunk < total_chunks()); tensors with no chunks are never stored.
  __device__ __forceinline__ int tensor_of(int64_t chunk) const {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (chunk_begin[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Calls launch(table, grid) once per table-full of `tensors` (all non-empty, dense, one dtype, on
// the current device). `launch` enqueues the kernel on the current stream; the launch is checked.
template <typename Launch>
void for_each_table(const std::vector<at::Tensor>& tensors, Launch&& launch) {
  const int max_grid = sm_count(c10::cuda::current_device()) * kBlocksPerSm;
  ChunkTable table;
  table.count = 0;
  table.chunk_begin[0] = 0;
  auto flush = [&]() {
    if (table.count == 0) return;
    const int64_t chunks = table.chunk_begin[table.count];
    const int grid = static_cast<int>(chunks < max_grid ? chunks : max_grid);
    launch(table, grid);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.count = 0;
  };
  for (const at::Tensor& t : tensors) {
    const int i = table.count;
    table.data[i] = t.data_ptr();
    table.numel[i] = t.numel();
    table.chunk_begin[i + 1] = table.chunk_begin[i] + chunks_of(t.numel());
    table.count = i + 1;
    if (table.count == kTableCapacity) flush();
  }
  flush();
}

}  // namespace fusedclip
