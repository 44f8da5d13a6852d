// The arithmetic of the norm and the clip coefficient, shared by the CUDA kernels and the CPU
// implementation so that both follow the same rules. (They agree to rounding, not bit for bit:
// the chunk reductions run in a different order, and nvcc contracts a * b + c into FMAs.)
//
// A partial result over some elements x_i is a pair (m, s) with
//   m = max |x_i|, and the sum of |x_i|^p = m^p * s,
// so that no finite input overflows or underflows whatever p is (and finish_norm forms the norm
// itself in log space where m * s^(1/p) would overflow). m also carries the non-finite
// state: NaN once any element was NaN, otherwise inf once any element was infinite; s means
// nothing then. A plain fp64 sum of |x|^p (p = 1 or 2 on fp16/bf16/fp32 input, where it cannot
// overflow: (3.4e38)^2 * 2^64 < 1.8e308) enters as (1, sum).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "engine/table.h"

namespace fusedclip {

// The precision the per-element work of T is done in: fp64 for fp64, fp32 for the rest (which
// holds every fp16/bf16 value exactly).
template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Norm types with their own code paths; any other p > 0 is kGeneral.
enum class NormKind : int32_t { kOne = 0, kTwo = 1, kInf = 2, kGeneral = 3 };

inline NormKind norm_kind(double p) {
  if (p == 1.0) return NormKind::kOne;
  if (p == 2.0) return NormKind::kTwo;
  if (std::isinf(p)) return NormKind::kInf;
  return NormKind::kGeneral;
}

// Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
constexpr double kNormEps = 1e-6;

struct Partial {
  double m;
  double s;
};

FUSEDCLIP_HD bool is_nan(double x) { return x != x; }
FUSEDCLIP_HD bool is_inf(double x) { return x == INFINITY; }  // magnitudes only: never -inf

// The smallest normal fp64 number.
constexpr double kMinNormal = 2.2250738585072014e-308;

// (b / a)^p for 0 <= b <= a, 0 < a < inf. Where the ratio is below the normal range it has lost
// bits or flushed to 0, yet for p < 1 its power is not negligible ((1e-400)^0.01 = 1e-4, beside
// the 1 of the largest magnitude): there the power is taken from the two logs instead.
FUSEDCLIP_HD double ratio_pow(double b, double a, double p, NormKind kind) {
  const double r = b / a;
  if (kind == NormKind::kTwo) return r * r;
  if (kind == NormKind::kOne) return r;
  if (r >= kMinNormal) return pow(r, p);
  return b == 0.0 ? 0.0 : exp(p * (log(b) - log(a)));
}

// A plain sum of |x|^p as a partial. A NaN sum becomes the canonical NaN: which NaN payload an
// fp add keeps depends on its operands' order, which differs between vector widths.
FUSEDCLIP_HD Partial from_plain_sum(double s) {
  if (is_nan(s)) return {NAN, 0.0};
  if (is_inf(s)) return {s, 0.0};
  return s == 0.0 ? Partial{0.0, 0.0} : Partial{1.0, s};
}

// The partial of the union of two disjoint sets of elements. Commutative bit for bit, so a fixed
// reduction tree gives the same bits on every run.
FUSEDCLIP_HD Partial combine(Partial a, Partial b, double p, NormKind kind) {
  if (is_nan(a.m)) return a;
  if (is_nan(b.m)) return b;
  if (a.m < b.m) {
    const Partial t = a;
    a = b;
    b = t;
  }
  if (kind == NormKind::kInf || b.m == 0.0 || is_inf(a.m)) return a;
  // Equal scales (always, for plain sums): no division, and (b.m / a.m)^p would be exactly 1.
  if (b.m == a.m) return {a.m, a.s + b.s};
  return {a.m, a.s + b.s * ratio_pow(b.m, a.m, p, kind)};
}

// Adds one magnitude a = |x| to a scaled partial, all in fp64.
FUSEDCLIP_HD void add_scaled(Partial& acc, double a, double p, NormKind kind) {
  if (a > acc.m) {
    acc.s = (acc.m == 0.0 ? 0.0 : acc.s * ratio_pow(acc.m, a, p, kind)) + 1.0;
    acc.m = a;
  } else if (is_nan(a)) {
    acc.m = a;
  } else if (a > 0.0) {
    acc.s += ratio_pow(a, acc.m, p, kind);
  }
}

// Sticky-NaN running max of magnitudes (the inf-norm): NaN once seen stays.
template <typename A>
FUSEDCLIP_HD A max_magnitude(A m, A a) {
  return (a > m || a != a) ? a : m;
}

// The norm a partial describes, times inv (the inverse loss scale; 1 without one):
// m * s^(1/p) * inv, or m * inv when m is 0, inf or NaN. It is finite wherever that value is.
// s^(1/p) alone overflows for a small p long before m brings the product back (2000 elements of
// 1e-100 and p = 0.01: s^(1/p) = 2000^100 = 1e330, the norm 1.3e230), and m * s^(1/p) can
// overflow where inv brings it back; then the product is formed in log space (relative error
// about 1e-13 there, from the logs' rounding).
FUSEDCLIP_HD double finish_norm(Partial t, double p, NormKind kind, double inv) {
  if (is_nan(t.m) || is_inf(t.m) || t.m == 0.0 || kind == NormKind::kInf) return t.m * inv;
  const double root = kind == NormKind::kOne   ? t.s
                      : kind == NormKind::kTwo ? sqrt(t.s)
                                               : pow(t.s, 1.0 / p);
  const double norm = t.m * root;
  if (!is_inf(norm)) return norm * inv;
  return exp(log(t.m) + log(t.s) / p + log(inv));
}

// How a norm becomes a coefficient: torch's hard min(1, max_norm / (norm + 1e-6)); the soft
// max_norm / (norm + max_norm), below 1 for every positive norm and smooth in it; or adaptive
// clipping's (AGC, as timm's adaptive_clip_grad): 1 under max_norm, else
// max_norm / max(norm, 1e-6).
enum class ClipMode : int32_t { kHard = 0, kSoft = 1, kAdaptive = 2 };

// The coefficient for `norm` under `max_norm`. A NaN norm gives NaN (torch's clamp keeps it) and an
// infinite one 0. Soft: 1 when there is nothing to shrink (norm 0) or no limit (max_norm inf).
FUSEDCLIP_HD double clip_coef(double norm, double max_norm, ClipMode mode = ClipMode::kHard) {
  if (mode == ClipMode::kAdaptive) {
    return norm < max_norm ? 1.0 : max_norm / (norm < 1e-6 ? 1e-6 : norm);
  }
  if (mode == ClipMode::kSoft) {
    if (is_nan(norm)) return norm;
    if (norm == 0.0 || is_inf(max_norm)) return 1.0;
    return max_norm / (norm + max_norm);
  }
  const double c = max_norm / (norm + kNormEps);
  return c > 1.0 ? 1.0 : c;
}

// The non-finite state of a partial: its m is NaN or inf exactly when an element was.
FUSEDCLIP_HD bool is_nonfinite(Partial t) { return is_nan(t.m) || is_inf(t.m); }

// The scalar outputs of pass 1 from the total partial, the same on every device. inv is the
// inverse loss scale (1 without one): the norm of x * inv is inv * the norm of x, and the factor
// that pass 2 multiplies by unscales as well as clips.
struct Finished {
  double norm;
  double coef;
  bool nonfinite;
};

FUSEDCLIP_HD Finished finish_total(Partial total, double p, NormKind kind, double max_norm,
                                   ClipMode mode, double inv) {
  const double norm = finish_norm(total, p, kind, inv);
  return {norm, clip_coef(norm, max_norm, mode) * inv, is_nonfinite(total)};
}

// x * c formed in fp64 and rounded to T through float, which is also how the reference (torch's
// fp64-to-fp16/bf16 conversion) rounds it.
template <typename T>
FUSEDCLIP_HD T scaled(T x, double c) {
  const double y = static_cast<double>(static_cast<float>(x)) * c;
  return static_cast<T>(static_cast<float>(y));
}
template <>
FUSEDCLIP_HD double scaled<double>(double x, double c) {
  return x * c;
}

// A Python float bound as torch converts it for a T tensor (through fp32 for fp16/bf16), returned
// exactly as fp64: inf past T's range (which clamps nothing), where torch's conversion raises.
template <typename T>
FUSEDCLIP_HD double bound_as(double v) {
  return static_cast<double>(static_cast<float>(static_cast<T>(static_cast<float>(v))));
}
template <>
FUSEDCLIP_HD double bound_as<double>(double v) {
  return v;
}

// x clamped to [-b, b], b exactly representable in T, as torch's clip_grad_value_ does it on each
// device (clamp_min, then clamp_max): NaN stays NaN and an element inside the bounds keeps its
// bits. The devices differ only in the sign of a zero result when b is 0: torch's CPU kernels
// keep x where it equals a bound (a negative x gives -0.0), its CUDA foreach kernels take the
// bound (every result is +0.0); kCudaRule selects the latter.
template <bool kCudaRule, typename T>
FUSEDCLIP_HD T clamped(T x, double b) {
  using M = math_t<T>;
  const M v = static_cast<M>(x), hi = static_cast<M>(b);
  if constexpr (kCudaRule) {
    // maximum(x, -b), then minimum(., b), with the operands in torch's CUDA foreach order.
    const bool nan = v != v;
    const M low = (nan || v > -hi) ? v : -hi;
    if (nan) return x;
    if (!(low < hi)) return static_cast<T>(hi);
    return low == v ? x : static_cast<T>(low);
  } else {
    if (v < -hi) return static_cast<T>(-hi);
    if (v > hi) return static_cast<T>(hi);
    return x;
  }
}

}  // namespace fusedclip
