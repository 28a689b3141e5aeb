// Entry points of the scaled Runge-Kutta ops; CPU and CUDA implement the same names in
// namespaces bespoke_ext::cpu and bespoke_ext::cuda. Contract (both devices):
//   - terms: k tensors of one shape/dtype/device, float16/bfloat16/float32/float64, any strides;
//   - coeffs: [k] (shared) or [N, k] (per sample along dim 0), float32 or float64;
//   - math in float32 (float64 for float64 terms); results in the terms' dtype, coefficient
//     gradients in the coeffs' dtype;
//   - a gradient that is not asked for (need_* = false) comes back as an empty list / a
//     0-element tensor.
#pragma once

#include <torch/types.h>

#include <tuple>
#include <vector>

namespace bespoke_ext {

#define BX_DECLARE_RK_OPS                                                                        \
  at::Tensor rk_update(at::TensorList terms, const at::Tensor& coeffs);                          \
  void rk_update_out(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& out);     \
  at::Tensor rk_residual(at::TensorList terms, const at::Tensor& coeffs,                         \
                         const at::Tensor& target);                                              \
  std::tuple<std::vector<at::Tensor>, at::Tensor> rk_update_backward(                            \
      const at::Tensor& grad, at::TensorList terms, const at::Tensor& coeffs, bool need_terms,   \
      bool need_coeffs);                                                                         \
  std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> rk_residual_backward(              \
      const at::Tensor& grad, const at::Tensor& rms, at::TensorList terms,                       \
      const at::Tensor& coeffs, const at::Tensor& target, bool need_terms, bool need_coeffs,     \
      bool need_target);

namespace cpu {
BX_DECLARE_RK_OPS
}
namespace cuda {
BX_DECLARE_RK_OPS
}

#undef BX_DECLARE_RK_OPS

// Registers the kernels of namespace NS for dispatch key KEY (once per device, in the file
// that holds them; needs torch/library.h).
#define BX_REGISTER_RK_OPS(KEY, NS)                                \
  TORCH_LIBRARY_IMPL(bespoke_ext, KEY, m) {                        \
    m.impl("rk_update", &NS::rk_update);                           \
    m.impl("rk_update_out", &NS::rk_update_out);                   \
    m.impl("rk_residual", &NS::rk_residual);                       \
    m.impl("rk_update_backward", &NS::rk_update_backward);         \
    m.impl("rk_residual_backward", &NS::rk_residual_backward);     \
  }

}  // namespace bespoke_ext
