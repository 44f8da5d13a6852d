// The one place where a tensor's runtime dtype becomes the kernels' template parameter.
#pragma once

#include <ATen/Dispatch.h>

// Gradient dtypes the fused kernels take: fp32, fp64, fp16 and bf16. Inside the body the dtype is
// `scalar_t`.
#define FUSEDCLIP_DISPATCH_FLOATING(DTYPE, NAME, ...)                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, DTYPE, \
                                  NAME, __VA_ARGS__)
