#include "engine/tuning.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fusedclip {
namespace {

// -1: not chosen yet (read FUSEDCLIP_CUDA_PASS1 at the next use).
std::atomic<int> current{-1};

int named(const char* name) {
  for (int i = 0; i < kNumPass1Variants; ++i) {
    if (std::strcmp(kPass1Variants[i].name, name) == 0) return i;
  }
  return -1;
}

int from_environment() {
  const char* env = std::getenv("FUSEDCLIP_CUDA_PASS1");
  if (env == nullptr || *env == '\0') return 0;
  const int i = named(env);
  if (i < 0) {
    throw std::invalid_argument(std::string("fusedclip: FUSEDCLIP_CUDA_PASS1=") + env +
                                " names no pass-1 variant; choose one of " +
                                pass1_variant_names() + " (or unset it for t512u4)");
  }
  return i;
}

}  // namespace

int pass1_variant() {
  int i = current.load(std::memory_order_acquire);
  if (i < 0) {
    i = from_environment();
    current.store(i, std::memory_order_release);
  }
  return i;
}

const char* pass1_variant_name() { return kPass1Variants[pass1_variant()].name; }

bool set_pass1_variant(const char* name) {
  const int i = named(name);
  if (i < 0) return false;
  current.store(i, std::memory_order_release);
  return true;
}

const char* pass1_variant_names() {
  static const std::string names = [] {
    std::string s;
    for (int i = 0; i < kNumPass1Variants; ++i) {
      if (i > 0) s += ", ";
      s += kPass1Variants[i].name;
    }
    return s;
  }();
  return names.c_str();
}

}  // namespace fusedclip
