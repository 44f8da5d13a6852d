// How the multi-tensor kernels are launched: kBlockThreads threads per block (pass 1: its
// variant's, engine/tuning.h), and persistent grids (as many blocks as the GPU holds at once,
// each striding over the chunks of its launch), sized by the occupancy calculator once per kernel
// and device.
#pragma once

#include <atomic>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace fusedclip {

constexpr int kBlockThreads = 512;

// Blocks per SM the occupancy calculator allows for `kernel` at `threads` per block, times the
// SMs: the grid of a persistent launch.
template <typename Kernel>
int persistent_grid(Kernel kernel, int device, int threads) {
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return sms * (per_sm > 0 ? per_sm : 1);
}

// persistent_grid(Kernel, device, kThreads), computed once per kernel and device.
template <auto Kernel, int kThreads = kBlockThreads>
int cached_persistent_grid(int device) {
  static std::atomic<int> cached[64] = {};
  if (device >= 64) return persistent_grid(Kernel, device, kThreads);
  if (cached[device].load() == 0) cached[device].store(persistent_grid(Kernel, device, kThreads));
  return cached[device].load();
}

// The grid of one persistent launch of Kernel over `chunks` chunks: never more blocks than chunks.
template <auto Kernel, int kThreads = kBlockThreads>
int grid_for_chunks(int device, int64_t chunks) {
  const int limit = cached_persistent_grid<Kernel, kThreads>(device);
  return static_cast<int>(chunks < limit ? chunks : limit);
}

}  // namespace fusedclip
