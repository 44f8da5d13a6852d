// Reading and updating one chunk of a tensor with 16-byte vector accesses, by the kBlockThreads
// threads of a block (launch.cuh).
//
// A chunk is split into a scalar head (up to the first 16-byte boundary), a vector body and a
// scalar tail, so a misaligned tensor (a view at an odd offset) still moves most of its bytes in
// vector accesses. Each thread keeps kUnroll (pass 1: its variant's) vector loads in flight before
// it uses any of them.
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

// Every element of data[begin, end) this thread owns, through f, with kThreads threads per block:
// the scalar head, the 16-byte packs (stored back when kWrite), the scalar tail. Thread i visits
// packs i, i + kThreads, i + 2 kThreads, ... in that order whatever kU is, so the unroll depth
// never changes a result.
//
// kSplit (reads only) runs full rounds first: kU unpredicated loads, all issued before the first
// is used, then the predicated remainder. With a predicate on every load (the remainder's form)
// nvcc sinks each load to its use for fp32 p = 1 and 2, which leaves one 16-byte load in flight
// per thread. The split doubles the loop's code, so only the cheap per-element functions take it:
// for any other p (a pow per element) it tripled ptxas' time, and their loads already stay in
// flight. Updates never split: pass 2 rose from 32 to 64 registers (4 to 2 blocks per SM).
template <int kThreads, int kU, bool kSplit, bool kWrite, typename T, typename F>
__device__ __forceinline__ void visit_chunk(T* __restrict__ data, int64_t begin, int64_t end,
                                            F& f) {
  using P = Pack<std::remove_const_t<T>>;
  const int64_t body = begin + head_elems(data, begin, end);
  for (int64_t k = begin + threadIdx.x; k < body; k += kThreads) apply<kWrite>(data[k], f);
  auto* packs = reinterpret_cast<std::conditional_t<kWrite, P, const P>*>(data + body);
  const int64_t n_packs = (end - body) / P::kSize;
  int64_t base = threadIdx.x;
  if constexpr (kSplit && !kWrite) {
    for (; base + (kU - 1) * kThreads < n_packs; base += kU * kThreads) {
      P r[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) r[u] = load_readonly(packs + base + u * kThreads);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
#pragma unroll
        for (int e = 0; e < P::kSize; ++e) f(r[u].v[e]);
      }
    }
  }
  for (; base < n_packs; base += kU * kThreads) {
    P r[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t k = base + u * kThreads;
      if (k < n_packs) {
        if constexpr (kWrite) {
          r[u] = load_global(packs + k);
        } else {
          r[u] = load_readonly(packs + k);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t k = base + u * kThreads;
      if (k < n_packs) {
#pragma unroll
        for (int e = 0; e < P::kSize; ++e) apply<kWrite>(r[u].v[e], f);
        if constexpr (kWrite) store_global(packs + k, r[u]);
      }
    }
  }
  for (int64_t k = body + n_packs * P::kSize + threadIdx.x; k < end; k += kThreads) {
    apply<kWrite>(data[k], f);
  }
}

// Calls f(x) for every element of data[begin, end) this thread owns (kThreads threads per block,
// kU loads in flight per thread; kSplit: see visit_chunk).
template <int kThreads, int kU, bool kSplit, typename T, typename F>
__device__ __forceinline__ void read_chunk(const T* data, int64_t begin, int64_t end, F&& f) {
  visit_chunk<kThreads, kU, kSplit, false>(data, begin, end, f);
}

// data[k] = f(data[k]) for every element of data[begin, end) this thread owns.
template <typename T, typename F>
__device__ __forceinline__ void update_chunk(T* data, int64_t begin, int64_t end, F&& f) {
  visit_chunk<kBlockThreads, kUnroll, false, true>(data, begin, end, f);
}

}  // namespace fusedclip
