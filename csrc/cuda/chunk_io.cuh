// Reading and updating one chunk of a tensor with 16-byte vector accesses, by the kBlockThreads
// threads of a block (launch.cuh).
//
// A chunk is split into a scalar head (up to the first 16-byte boundary), a vector body and a
// scalar tail, so a misaligned tensor (a view at an odd offset) still moves most of its bytes in
// vector accesses. Each thread keeps kUnroll vector loads in flight before it uses any of them.
// The element each thread sees, and in what order, depends only on the chunk and the block size:
// per-thread accumulations are therefore the same on every run.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_runtime.h>

#include "cuda/launch.cuh"

namespace fusedclip {

constexpr int kUnroll = 4;

// 16 bytes of T.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Vector accesses through the global state space. The table hands kernels integer addresses, so
// without these nvcc cannot prove the memory is global and emits generic LD/ST instructions.
// Pass 1 reads through the read-only (non-coherent) path; pass 2 reads and writes at L2 (.cg).
template <typename P>
__device__ __forceinline__ P load_readonly(const P* p) {
  static_assert(sizeof(P) == sizeof(uint4), "a pack is 16 bytes");
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  P r;
  memcpy(&r, &v, sizeof(P));
  return r;
}

template <typename P>
__device__ __forceinline__ P load_global(const P* p) {
  const uint4 v = __ldcg(reinterpret_cast<const uint4*>(p));
  P r;
  memcpy(&r, &v, sizeof(P));
  return r;
}

template <typename P>
__device__ __forceinline__ void store_global(P* p, const P& r) {
  uint4 v;
  memcpy(&v, &r, sizeof(P));
  __stcg(reinterpret_cast<uint4*>(p), v);
}

// Elements of data[begin, end) before the first 16-byte boundary, or all of them when the address
// is not even a multiple of sizeof(T).
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* data, int64_t begin, int64_t end) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(data + begin);
  const uintptr_t mis = addr % 16;
  if (mis % sizeof(T) != 0) return end - begin;
  const int64_t head = static_cast<int64_t>(((16 - mis) % 16) / sizeof(T));
  return head < end - begin ? head : end - begin;
}

// One element through f: read only (f(x)), or updated in place (x = f(x)).
template <bool kWrite, typename T, typename F>
__device__ __forceinline__ void apply(T& x, F& f) {
  if constexpr (kWrite) {
    x = f(x);
  } else {
    f(x);
  }
}

// Every element of data[begin, end) this thread owns, through f: the scalar head, the 16-byte
// packs (kUnroll loads in flight before any is used; stored back when kWrite), the scalar tail.
template <bool kWrite, typename T, typename F>
__device__ __forceinline__ void visit_chunk(T* __restrict__ data, int64_t begin, int64_t end,
                                            F& f) {
  using P = Pack<std::remove_const_t<T>>;
  const int64_t body = begin + head_elems(data, begin, end);
  for (int64_t k = begin + threadIdx.x; k < body; k += kBlockThreads) apply<kWrite>(data[k], f);
  auto* packs = reinterpret_cast<std::conditional_t<kWrite, P, const P>*>(data + body);
  const int64_t n_packs = (end - body) / P::kSize;
  for (int64_t base = threadIdx.x; base < n_packs; base += kUnroll * kBlockThreads) {
    P r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kBlockThreads;
      if (k < n_packs) {
        if constexpr (kWrite) {
          r[u] = load_global(packs + k);
        } else {
          r[u] = load_readonly(packs + k);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kBlockThreads;
      if (k < n_packs) {
#pragma unroll
        for (int e = 0; e < P::kSize; ++e) apply<kWrite>(r[u].v[e], f);
        if constexpr (kWrite) store_global(packs + k, r[u]);
      }
    }
  }
  for (int64_t k = body + n_packs * P::kSize + threadIdx.x; k < end; k += kBlockThreads) {
    apply<kWrite>(data[k], f);
  }
}

// Calls f(x) for every element of data[begin, end) this thread owns.
template <typename T, typename F>
__device__ __forceinline__ void read_chunk(const T* data, int64_t begin, int64_t end, F&& f) {
  visit_chunk<false>(data, begin, end, f);
}

// data[k] = f(data[k]) for every element of data[begin, end) this thread owns.
template <typename T, typename F>
__device__ __forceinline__ void update_chunk(T* data, int64_t begin, int64_t end, F&& f) {
  visit_chunk<true>(data, begin, end, f);
}

}  // namespace fusedclip
