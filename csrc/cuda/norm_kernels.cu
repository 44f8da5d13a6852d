// Pass 1 of the clip: the global p-norm (and clip coefficient) of every tensor of a plan.
//
// One read of every element, nothing written but one (m, s) partial per 64Ki-element chunk (a few
// bytes per 128 KiB read). Each block reduces its chunks' elements in a fixed tree; the last block
// to finish (elected by an atomic counter, not by a second launch) combines the chunk partials in
// a fixed order and writes the total norm, the clip coefficient and, when asked, each tensor's
// norm or partial. finish_pass_cuda is that last step alone, over partials made earlier (one per
// gradient, by BackwardClipper during backward): one block reads 16 bytes per gradient. Nothing
// about the result depends on the grid size or the order blocks finish in, so for one pass-1
// variant (engine/tuning.h) it is bitwise identical from run to run (and from GPU to GPU). No host
// synchronization anywhere.
//
// Accumulation (norm_math.h): p = 1 and 2 on fp16/bf16/fp32 sum |x|^p in fp64, which no finite
// input can overflow; inf takes a running max; any other p, and fp64 input, keep the scaled pair
// (max, sum of (|x| / max)^p) per thread.

#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/chunk_io.cuh"
#include "cuda/launch.cuh"
#include "cuda/passes_cuda.h"
#include "engine/dispatch.h"
#include "engine/norm_math.h"
#include "engine/plan.h"
#include "engine/request.h"
#include "engine/tuning.h"

namespace fusedclip {
namespace {

// Per-thread accumulation of one chunk, one specialisation per way of accumulating.
enum class Accum { kPlain, kMax, kScaled };

template <typename T, NormKind K>
constexpr Accum accum_for() {
  if (K == NormKind::kInf) return Accum::kMax;
  if (std::is_same_v<T, double> || K == NormKind::kGeneral) return Accum::kScaled;
  return Accum::kPlain;
}

template <typename T, NormKind K, Accum A = accum_for<T, K>()>
struct ThreadAcc;

template <typename T, NormKind K>
struct ThreadAcc<T, K, Accum::kPlain> {
  double s = 0.0;
  __device__ __forceinline__ void add(T x, double) {
    const double a = fabs(static_cast<double>(static_cast<float>(x)));
    s += K == NormKind::kTwo ? a * a : a;
  }
  __device__ __forceinline__ Partial partial() const { return from_plain_sum(s); }
};

template <typename T, NormKind K>
struct ThreadAcc<T, K, Accum::kMax> {
  math_t<T> m = 0;
  __device__ __forceinline__ void add(T x, double) {
    m = max_magnitude(m, static_cast<math_t<T>>(fabs(static_cast<math_t<T>>(x))));
  }
  __device__ __forceinline__ Partial partial() const { return {static_cast<double>(m), 0.0}; }
};

template <typename T, NormKind K>
struct ThreadAcc<T, K, Accum::kScaled> {
  Partial acc{0.0, 0.0};
  __device__ __forceinline__ void add(T x, double p) {
    add_scaled(acc, fabs(static_cast<double>(x)), p, K);
  }
  __device__ __forceinline__ Partial partial() const { return acc; }
};

// The combination of the warp's 32 partials, valid in lane 0: a fixed shuffle tree.
__device__ __forceinline__ Partial warp_reduce(Partial v, double p, NormKind kind) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Partial other{__shfl_down_sync(0xffffffffu, v.m, offset),
                        __shfl_down_sync(0xffffffffu, v.s, offset)};
    v = combine(v, other, p, kind);
  }
  return v;
}

// The combination of every thread's partial (kThreads of them), valid in thread 0. Fixed tree:
// each warp, then warp 0 over the warps' results. Ends with the shared buffer free again. Zero
// partials are exact identities of combine, so threads holding zeros past the first k warps leave
// the result of a kThreads-thread block equal to that of a k-warp one.
template <int kThreads>
__device__ Partial block_reduce(Partial v, double p, NormKind kind) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double shared_m[kWarps], shared_s[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v, p, kind);
  if (lane == 0) {
    shared_m[warp] = v.m;
    shared_s[warp] = v.s;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? Partial{shared_m[lane], shared_s[lane]} : Partial{0.0, 0.0};
    v = warp_reduce(v, p, kind);
  }
  __syncthreads();
  return v;
}

struct Pass1Args {
  TableView table;
  int64_t chunk_lo, chunk_hi;  // this launch's dtype group
  double* partials;            // [2 * num_chunks], this call's workspace
  unsigned int* counter;       // zeroed on the stream before the first launch
  unsigned int total_blocks;   // blocks of all launches of this pass
  NormRequest out;
};

__device__ __forceinline__ Partial load_partial(const double* partials, int64_t c) {
  // Written by other blocks: read past L1.
  return {__ldcg(partials + 2 * c), __ldcg(partials + 2 * c + 1)};
}

template <typename T>
__device__ void store_as(void* dst, double v) {
  *static_cast<T*>(dst) = static_cast<T>(static_cast<float>(v));
}

// The finish's width: its first kFinishThreads threads stride over the chunk partials, so the
// result is the same whichever pass-1 variant's block (every one has at least this many threads)
// is elected last.
constexpr int kFinishThreads = 256;

// Run by the last block only (kThreads threads): combine every chunk partial and write the
// outputs. kBatch partials are loaded before any is combined, so the loop pays one L2 round trip
// per batch rather than per partial; each thread combines in the same order whatever kBatch is.
// Batches cost registers (4 partials: 16) and, where combine takes a pow, code: pass 1 batches
// for its plain sums only.
template <int kThreads, int kBatch>
__device__ void finish(const Pass1Args& a, NormKind kind) {
  static_assert(kThreads >= kFinishThreads && kThreads % 32 == 0, "finish needs 256 threads");
  if (!a.out.wants_total()) return;  // the same for every thread of the block
  const double p = a.out.p;
  const int64_t n = a.table.num_chunks;
  Partial acc{0.0, 0.0};
  if (threadIdx.x < kFinishThreads) {
    int64_t c = threadIdx.x;
    if constexpr (kBatch > 1) {
      for (; c + (kBatch - 1) * kFinishThreads < n; c += kBatch * kFinishThreads) {
        Partial part[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) part[b] = load_partial(a.partials, c + b * kFinishThreads);
#pragma unroll
        for (int b = 0; b < kBatch; ++b) acc = combine(acc, part[b], p, kind);
      }
    }
    for (; c < n; c += kFinishThreads) acc = combine(acc, load_partial(a.partials, c), p, kind);
  }
  acc = block_reduce<kThreads>(acc, p, kind);
  const double inv = a.out.inv_scale ? static_cast<double>(*a.out.inv_scale) : 1.0;
  if (threadIdx.x == 0) {
    const Finished f = finish_total(acc, p, kind, a.out.max_norm, a.out.mode, inv);
    const double norm = f.norm;
    if (a.out.norm) *a.out.norm = norm;
    if (a.out.coef) *a.out.coef = f.coef;
    if (a.out.found_inf && f.nonfinite) *a.out.found_inf = 1.0f;
    if (a.out.norm_out) {
      switch (a.out.norm_out_dtype) {
        case at::kDouble: *static_cast<double*>(a.out.norm_out) = norm; break;
        case at::kFloat: *static_cast<float*>(a.out.norm_out) = static_cast<float>(norm); break;
        case at::kHalf: store_as<at::Half>(a.out.norm_out, norm); break;
        case at::kBFloat16: store_as<at::BFloat16>(a.out.norm_out, norm); break;
        default: break;
      }
    }
  }
}

// Each tensor's own outputs (its norm, its coefficient for per-tensor clipping), after pass 1 on
// the same stream: a warp per tensor, its lanes striding over the tensor's chunk partials, then
// a fixed shuffle tree. A launch of its own, so that many tensors (AGC's units: every row of
// every weight) are finished by the whole GPU rather than by pass 1's last block.
__global__ void __launch_bounds__(kBlockThreads)
    tensor_outputs_kernel(const TableView table, const double* __restrict__ partials,
                          const NormRequest out, NormKind kind) {
  const double p = out.p;
  const double inv = out.inv_scale ? static_cast<double>(*out.inv_scale) : 1.0;
  constexpr int kWarps = kBlockThreads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t t = blockIdx.x * kWarps + threadIdx.x / 32; t < table.num_tensors; t += stride) {
    const int64_t first = table.first_chunk[t], end = first + chunks_of(table.numel[t]);
    Partial own{0.0, 0.0};
    for (int64_t c = first + lane; c < end; c += 32) {
      own = combine(own, {partials[2 * c], partials[2 * c + 1]}, p, kind);
    }
    own = warp_reduce(own, p, kind);
    if (lane == 0) write_tensor_outputs(out, t, own, kind, inv);
  }
}

// Whether pass 1 on T for K reads in split loops (chunk_io.cuh's kSplit): the plain sums.
template <typename T, NormKind K>
constexpr bool kSplitReads = accum_for<T, K>() == Accum::kPlain;

// Pass 1 (see the top of this file) with kThreads threads per block and kU 16-byte loads in flight
// per thread. The split loops get at most 64 registers ((kThreads, 1024 / kThreads) blocks: 2 of
// 512 per SM): without the cap ptxas gives the bf16 p = 2 kernel 84, one block per SM. The other
// kernels get no minimum (0: as if omitted), which leaves ptxas' own choice: with a minimum of 2
// p = inf on fp32 took 55 registers instead of 34 (2 blocks per SM instead of 3) and fp64 p = 1, 2
// spilled; with a minimum of 1 they took 63 to 78.
template <typename T, NormKind K, int kThreads, int kU>
__global__ void __launch_bounds__(kThreads, kSplitReads<T, K> ? 1024 / kThreads : 0)
    norm_kernel(const Pass1Args a) {
  const double p = a.out.p;
  for (int64_t chunk = a.chunk_lo + blockIdx.x; chunk < a.chunk_hi; chunk += gridDim.x) {
    const ChunkSpan span = a.table.span(chunk);
    ThreadAcc<T, K> acc;
    read_chunk<kThreads, kU, kSplitReads<T, K>>(a.table.data<const T>(span.tensor), span.begin,
                                                span.end, [&](T x) { acc.add(x, p); });
    const Partial part = block_reduce<kThreads>(acc.partial(), p, K);
    if (threadIdx.x == 0) {
      a.partials[2 * chunk] = part.m;
      a.partials[2 * chunk + 1] = part.s;
    }
  }
  // Elect the last block: thread 0 wrote this block's partials; publish them, then count.
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(a.counter, 1u) == a.total_blocks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  finish<kThreads, kSplitReads<T, K> ? 4 : 1>(a, K);
}

// The finish alone, over partials made by earlier launches (BackwardClipper's, one per gradient):
// one block, the same combination as pass 1's last block.
__global__ void __launch_bounds__(kBlockThreads) finish_kernel(const Pass1Args a, NormKind kind) {
  finish<kBlockThreads, 1>(a, kind);
}

// One pass-1 kernel and its block size: its persistent grid and its launch.
template <auto Kernel, int kThreads>
struct Pass1Kernel {
  static int grid(int device, int64_t chunks) {
    return std::max(1, grid_for_chunks<Kernel, kThreads>(device, chunks));
  }
  static void launch(int grid, const Pass1Args& a, cudaStream_t stream) {
    Kernel<<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename T, NormKind K, int V>
using VariantKernel =
    Pass1Kernel<norm_kernel<T, K, kPass1Variants[V].threads, kPass1Variants[V].unroll>,
                kPass1Variants[V].threads>;

// fn(Pass1Kernel<...>{}) for norm_kernel<T, kind> in pass-1 variant `variant` (engine/tuning.h).
// Only p = 2 on fp32, bf16 and fp16 has variants compiled in (each costs build time); every other
// kernel is the default, t512u4.
template <typename T, NormKind K, typename Fn>
void with_variant(int variant, Fn&& fn) {
  static_assert(kNumPass1Variants == 4, "instantiate every variant below");
  if constexpr (K == NormKind::kTwo && !std::is_same_v<T, double>) {
    switch (variant) {
      case 1: return fn(VariantKernel<T, K, 1>{});
      case 2: return fn(VariantKernel<T, K, 2>{});
      case 3: return fn(VariantKernel<T, K, 3>{});
      default: break;
    }
  }
  fn(VariantKernel<T, K, 0>{});
}

template <typename T, typename Fn>
void with_norm_kernel(NormKind kind, int variant, Fn&& fn) {
  switch (kind) {
    case NormKind::kOne: with_variant<T, NormKind::kOne>(variant, fn); break;
    case NormKind::kTwo: with_variant<T, NormKind::kTwo>(variant, fn); break;
    case NormKind::kInf: with_variant<T, NormKind::kInf>(variant, fn); break;
    case NormKind::kGeneral: with_variant<T, NormKind::kGeneral>(variant, fn); break;
  }
}

}  // namespace

void finish_pass_cuda(const double* partials, int64_t n, const c10::Device& device,
                      const NormRequest& request) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  // Only the table's chunk count and the partials are read by finish().
  TableView table{};
  table.num_chunks = n;
  const Pass1Args a{table, 0, n, const_cast<double*>(partials), nullptr, 1, request};
  finish_kernel<<<1, kBlockThreads, 0, stream>>>(a, norm_kind(request.p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void norm_pass_cuda(const Plan& plan, const NormRequest& request) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const int device = plan.device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const NormKind kind = norm_kind(request.p);
  const int variant = pass1_variant();

  // This call's workspace: the chunk partials and the counter that elects the last block. From
  // the caching allocator (stream- and graph-aware), so concurrent calls never share it.
  const at::Tensor workspace = at::empty(
      {2 * plan.num_chunks + 1}, at::TensorOptions().dtype(at::kDouble).device(plan.device));
  double* partials = workspace.data_ptr<double>();
  auto* counter = reinterpret_cast<unsigned int*>(partials + 2 * plan.num_chunks);
  C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));
  Pass1Args a{plan.view(), 0, 0, partials, counter, 0, request};
  // With no elements at all one block still runs, to write the outputs (norm 0).
  std::vector<Group> groups = plan.groups;
  if (groups.empty()) groups.push_back({at::kFloat, true, 0, 0});
  std::vector<int> grids;
  unsigned int total = 0;
  for (const Group& g : groups) {
    int grid = 1;
    FUSEDCLIP_DISPATCH_FLOATING(g.dtype, "fusedclip::total_norm", [&] {
      with_norm_kernel<scalar_t>(kind, variant, [&](auto k) {
        grid = k.grid(device, g.chunk_hi - g.chunk_lo);
      });
    });
    grids.push_back(grid);
    total += static_cast<unsigned int>(grid);
  }
  a.total_blocks = total;
  for (size_t i = 0; i < groups.size(); ++i) {
    a.chunk_lo = groups[i].chunk_lo;
    a.chunk_hi = groups[i].chunk_hi;
    FUSEDCLIP_DISPATCH_FLOATING(groups[i].dtype, "fusedclip::total_norm", [&] {
      with_norm_kernel<scalar_t>(kind, variant, [&](auto k) { k.launch(grids[i], a, stream); });
    });
  }
  if (request.wants_tensors() && plan.keys.size() > 0) {
    constexpr int kWarps = kBlockThreads / 32;
    const int64_t blocks = (static_cast<int64_t>(plan.keys.size()) + kWarps - 1) / kWarps;
    const int grid = static_cast<int>(std::min<int64_t>(
        blocks, cached_persistent_grid<tensor_outputs_kernel>(device)));
    tensor_outputs_kernel<<<grid, kBlockThreads, 0, stream>>>(plan.view(), partials, request,
                                                              kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fusedclip
