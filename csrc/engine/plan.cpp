// Plan building and the plan cache (plan.h), and the registry of device engines (device.h).
// Device-agnostic: each device's part of a plan is its engine's init_plan and make_ready.

#include "engine/plan.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <mutex>
#include <unordered_map>

#include <ATen/ops/empty.h>
#include <ATen/ops/promote_types.h>
#include <c10/util/Exception.h>

#include "engine/checks.h"

namespace fusedclip {
namespace {

// Plans kept, most recently used first. Training loops use one or two parameter lists.
constexpr size_t kCacheSize = 8;
// Plans of one tensor kept besides (BackwardClipper takes every gradient's partial on its own, as
// backward writes it: one plan per parameter, reused while the gradient keeps its memory). Past
// this many, the ones no captured graph reads are dropped at once.
constexpr size_t kSingleCacheSize = 1 << 14;

struct SingleKey {
  TensorKey key;
  at::Device device;
  bool operator==(const SingleKey& o) const { return key == o.key && device == o.device; }
};

struct SingleKeyHash {
  size_t operator()(const SingleKey& k) const {
    size_t h = std::hash<int64_t>()(k.key.addr);
    h = h * 31 + std::hash<int64_t>()(k.key.numel);
    h = h * 31 + static_cast<size_t>(k.key.dtype);
    return h * 31 + std::hash<at::Device>()(k.device);
  }
};

struct Cache {
  std::mutex mutex;
  std::vector<std::shared_ptr<Plan>> plans;
  std::unordered_map<SingleKey, std::shared_ptr<Plan>, SingleKeyHash> single;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: plans may outlive static destruction order
  return *c;
}

std::atomic<int64_t> built{0};

// Engines by device type, filled by static initializers before any lookup.
std::array<const DeviceEngine*, c10::COMPILE_TIME_MAX_DEVICE_TYPES>& engines() {
  static std::array<const DeviceEngine*, c10::COMPILE_TIME_MAX_DEVICE_TYPES> e{};
  return e;
}

}  // namespace

// Refuses tensors whose memory ranges overlap: the kernels would read them twice and race on
// writes. One sort of the tensors by address, when a plan is built (or first used for writing).
// The words are those of the public functions' own check (fusedclip/_args.py SHARED_MESSAGE,
// without an operator's name in front), so that their one-call path, which reaches only this
// one, refuses dense gradients exactly as their general path does.
void check_disjoint(const std::vector<TensorKey>& keys) {
  std::vector<size_t> order;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (keys[i].numel > 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return keys[a].addr < keys[b].addr; });
  for (size_t k = 1; k < order.size(); ++k) {
    const TensorKey& prev = keys[order[k - 1]];
    const int64_t prev_end = prev.addr + prev.numel * static_cast<int64_t>(c10::elementSize(prev.dtype));
    TORCH_CHECK_VALUE(keys[order[k]].addr >= prev_end, "gradients[",
                      std::min(order[k - 1], order[k]), "] and gradients[",
                      std::max(order[k - 1], order[k]),
                      "] share memory (the same tensor twice, or views of one buffer); fusedclip "
                      "takes every element once: give each its own storage (.clone())");
  }
}

namespace {

std::shared_ptr<Plan> build(const std::vector<TensorKey>& keys, at::Device device,
                            const char* op, bool written) {
  const DeviceEngine& engine = engine_for(device, op);
  if (written) check_disjoint(keys);
  auto plan = std::make_shared<Plan>();
  plan->device = device;
  plan->engine = &engine;
  plan->keys = keys;
  plan->disjoint = written || keys.size() <= 1;
  const int64_t n = static_cast<int64_t>(keys.size());

  // Chunks grouped by dtype and 16-byte alignment of the tensor's base (the Triton kernels take
  // alignment as a compile-time fact; the CUDA kernels handle both in one), in a fixed order,
  // tensors in list order inside a group.
  std::vector<int64_t> first_chunk(n, 0), chunk_tensor;
  const at::ScalarType order[] = {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble};
  plan->result_dtype = at::kFloat;
  for (const TensorKey& k : keys) {
    plan->result_dtype = at::promote_types(plan->result_dtype, k.dtype);
  }
  for (at::ScalarType dtype : order) {
    for (bool aligned : {true, false}) {
      Group g{dtype, aligned, static_cast<int64_t>(chunk_tensor.size()), 0};
      for (int64_t t = 0; t < n; ++t) {
        if (keys[t].dtype != dtype || (keys[t].addr % 16 == 0) != aligned) continue;
        first_chunk[t] = static_cast<int64_t>(chunk_tensor.size());
        chunk_tensor.insert(chunk_tensor.end(), chunks_of(keys[t].numel), t);
      }
      g.chunk_hi = static_cast<int64_t>(chunk_tensor.size());
      if (g.chunk_hi > g.chunk_lo) plan->groups.push_back(g);
    }
  }
  plan->num_chunks = static_cast<int64_t>(chunk_tensor.size());

  std::vector<int64_t> host(3 * n + plan->num_chunks);
  for (int64_t t = 0; t < n; ++t) {
    host[t] = keys[t].addr;
    host[n + t] = keys[t].numel;
    host[2 * n + t] = first_chunk[t];
  }
  std::copy(chunk_tensor.begin(), chunk_tensor.end(), host.begin() + 3 * n);
  plan->table = at::empty({static_cast<int64_t>(host.size())},
                          at::TensorOptions().device(device).dtype(at::kLong));
  plan->host_table = std::move(host);
  engine.init_plan(*plan);  // the CPU writes the table now; CUDA uploads it in make_ready
  built.fetch_add(1);
  return plan;
}

}  // namespace

bool register_engine(c10::DeviceType type, const DeviceEngine& engine) {
  const DeviceEngine*& slot = engines().at(static_cast<size_t>(type));
  TORCH_INTERNAL_ASSERT(slot == nullptr, "fusedclip: two engines registered for ", type);
  slot = &engine;
  return true;
}

const DeviceEngine* find_engine(c10::DeviceType type) {
  const auto i = static_cast<size_t>(type);
  return i < engines().size() ? engines()[i] : nullptr;
}

const char* no_engine_reason(c10::DeviceType type) {
  if (type == c10::DeviceType::CUDA) {
    return "fusedclip._C was built without its CUDA kernels (no nvcc or a CPU-only torch at "
           "build time)";
  }
  return "the fused kernels run on CUDA (and the CPU)";
}

const DeviceEngine& engine_for(const c10::Device& device, const char* op) {
  const DeviceEngine* engine = find_engine(device.type());
  TORCH_CHECK(engine != nullptr, op, ": tensors are on ", device, "; ",
              no_engine_reason(device.type()));
  return *engine;
}

void check_plain(const at::Tensor& t, const at::Device& device, const char* op, size_t index) {
  TORCH_CHECK(find_engine(device.type()) != nullptr, op, ": tensors[", index, "] is on ", device,
              "; ", no_engine_reason(device.type()));
  TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", index, "] has layout ", t.layout(),
              "; the fused backends take strided (dense) tensors only");
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), op, ": tensors[", index, "] has dtype ",
              t.scalar_type(), "; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(t.device() == device, op, ": tensors[", index, "] is on ", t.device(),
              " but tensors[0] is on ", device);
  TORCH_CHECK(!t._is_zerotensor(), op, ": tensors[", index,
              "] is a ZeroTensor, which has no memory to scale in place");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": tensors[", index,
              "] is a view with gaps or overlapping elements; the fused kernels take dense "
              "tensors (contiguous or permuted)");
}

TensorKey key_of(const at::Tensor& t) {
  const int64_t n = t.numel();
  const int64_t addr = n == 0 ? 0 : static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr()));
  return {addr, n, t.scalar_type()};
}

namespace {

// plan_for of one tensor, through the cache of one-tensor plans (c's mutex held).
std::shared_ptr<Plan> single_plan_for(Cache& c, const TensorKey& key, at::Device device,
                                      const char* op) {
  const SingleKey k{key, device};
  auto found = c.single.find(k);
  if (found != c.single.end()) {
    found->second->engine->make_ready(*found->second);
    return found->second;
  }
  std::shared_ptr<Plan> plan = build({key}, device, op, true);
  plan->engine->make_ready(*plan);
  if (c.single.size() >= kSingleCacheSize) {
    for (auto it = c.single.begin(); it != c.single.end();) {
      it = it->second->pinned ? std::next(it) : c.single.erase(it);
    }
  }
  c.single.emplace(k, plan);
  return plan;
}

}  // namespace

std::shared_ptr<Plan> plan_for(const std::vector<TensorKey>& keys, at::Device device,
                               const char* op, bool written) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (keys.size() == 1) return single_plan_for(c, keys[0], device, op);
  for (size_t i = 0; i < c.plans.size(); ++i) {
    std::shared_ptr<Plan> plan = c.plans[i];
    if (plan->device == device && plan->keys == keys) {
      if (written && !plan->disjoint) {  // built for reading only: checked once, now
        check_disjoint(keys);
        plan->disjoint = true;
      }
      std::rotate(c.plans.begin(), c.plans.begin() + i, c.plans.begin() + i + 1);
      plan->engine->make_ready(*plan);
      return plan;
    }
  }
  std::shared_ptr<Plan> plan = build(keys, device, op, written);
  plan->engine->make_ready(*plan);
  c.plans.insert(c.plans.begin(), plan);
  // Evict the least recently used plans, but never one a captured graph still reads.
  for (size_t i = c.plans.size(); i-- > kCacheSize;) {
    if (!c.plans[i]->pinned) c.plans.erase(c.plans.begin() + i);
  }
  return plan;
}

std::shared_ptr<Plan> plan_for(at::TensorList tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": expected at least one tensor");
  const at::Device device = tensors[0].device();
  std::vector<TensorKey> keys;
  keys.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_plain(tensors[i], device, op, i);
    keys.push_back(key_of(tensors[i]));
  }
  return plan_for(keys, device, op);
}

void clear_plan_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.plans.erase(std::remove_if(c.plans.begin(), c.plans.end(),
                               [](const std::shared_ptr<Plan>& p) { return !p->pinned; }),
                c.plans.end());
  for (auto it = c.single.begin(); it != c.single.end();) {
    it = it->second->pinned ? std::next(it) : c.single.erase(it);
  }
}

int64_t plans_built() { return built.load(); }

}  // namespace fusedclip
