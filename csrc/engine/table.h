// The tensor table that multi-tensor kernels walk, shared by host and device code.
//
// A plan (plan.h) lays every tensor of a call out as fixed-size chunks and stores, in one int64
// array in the tensors' device memory:
//
//   addr[T]          base address of tensor t (dense: its elements are addr .. addr + numel)
//   numel[T]         element count of tensor t (0 for empty tensors, which own no chunks)
//   first_chunk[T]   index of tensor t's first chunk
//   chunk_tensor[C]  the tensor that owns chunk c
//
// Chunks are grouped by dtype and alignment (one launch per group) and, inside a group, follow the
// tensors' order. Work and reduction order depend only on this table, never on the grid size.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDCLIP_HD __host__ __device__ __forceinline__
#else
#define FUSEDCLIP_HD inline
#endif

namespace fusedclip {

// Elements per chunk: a multiple of every vector width, so each chunk of a tensor starts exactly
// as (mis)aligned as the tensor itself.
constexpr int64_t kChunkElems = int64_t{1} << 16;

FUSEDCLIP_HD int64_t chunks_of(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

// One chunk: elements [begin, end) of tensor `tensor`.
struct ChunkSpan {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct TableView {
  const int64_t* addr;
  const int64_t* numel;
  const int64_t* first_chunk;
  const int64_t* chunk_tensor;
  int64_t num_tensors;
  int64_t num_chunks;

  FUSEDCLIP_HD ChunkSpan span(int64_t chunk) const {
    const int64_t t = chunk_tensor[chunk];
    const int64_t begin = (chunk - first_chunk[t]) * kChunkElems;
    const int64_t n = numel[t];
    return {t, begin, begin + kChunkElems < n ? begin + kChunkElems : n};
  }

  template <typename T>
  FUSEDCLIP_HD T* data(int64_t t) const {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(addr[t]));
  }
};

// Where the table's arrays start inside the plan's int64 buffer of 3 * T + C entries.
inline TableView table_view(const int64_t* base, int64_t num_tensors, int64_t num_chunks) {
  return {base, base + num_tensors, base + 2 * num_tensors, base + 3 * num_tensors, num_tensors,
          num_chunks};
}

}  // namespace fusedclip
