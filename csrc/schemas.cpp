// Operator schemas of the bespoke_ext namespace: defined once, here. Kernels register
// implementations per device (cpu/rk_kernels.cpp, cuda/rk_kernels.cu); fake kernels and
// autograd are registered from Python (bespoke_ext/ops.py).
//
//   rk_update(terms, coeffs)            out  = sum_j c[.., j] * terms[j]
//   rk_update_out(terms, coeffs, out)   the same, written into `out` (no allocation, no gradient)
//   rk_residual(terms, coeffs, target)  rms[n] = sqrt(mean_i (sum_j c[n?, j] terms[j][n, i] - target[n, i])^2)
//   rk_update_backward / rk_residual_backward: gradients for every input in one pass;
//   coefficient gradients are reduced in a fixed order (the same bits every run).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#ifndef BESPOKE_EXT_NO_PYTHON
#include <Python.h>

// An empty module: importing bespoke_ext._C loads this library, which runs the
// registrations below. The ops are reached through torch.ops.bespoke_ext.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(bespoke_ext, m) {
  m.def("rk_update(Tensor[] terms, Tensor coeffs) -> Tensor");
  m.def("rk_update_out(Tensor[] terms, Tensor coeffs, Tensor(a!) out) -> ()");
  m.def("rk_residual(Tensor[] terms, Tensor coeffs, Tensor target) -> Tensor");
  m.def(
      "rk_update_backward(Tensor grad, Tensor[] terms, Tensor coeffs, bool need_terms, "
      "bool need_coeffs) -> (Tensor[], Tensor)");
  m.def(
      "rk_residual_backward(Tensor grad, Tensor rms, Tensor[] terms, Tensor coeffs, "
      "Tensor target, bool need_terms, bool need_coeffs, bool need_target) "
      "-> (Tensor[], Tensor, Tensor)");
}

// rk_update_out writes into `out` and has no gradient (its schema says so). Its autograd kernel does
// what autograd does for torch's own out= ops: it refuses inputs that require grad while grad mode is
// on (the write could not be differentiated, and a graph that saved `out` would read the new values)
// and bumps out's version, so that a backward that saved `out` before the write fails loudly instead
// of using the new values. Unboxed: the default fallback would box every call, the one cost of a small
// update that does not scale with its size. Under inference_mode autograd keys are skipped, so the
// sampling loop goes straight to the device kernel.
namespace {

void rk_update_out_autograd(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& out) {
  if (at::GradMode::is_enabled()) {
    bool needs = coeffs.requires_grad() || out.requires_grad();
    for (const auto& t : terms) needs = needs || t.requires_grad();
    TORCH_CHECK(!needs,
                "rk_update_out: writes into `out` and has no gradient, but an input requires grad (terms, "
                "coeffs or out): use rk_update, which allocates its result and is differentiable, or call "
                "it under torch.no_grad()");
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bespoke_ext::rk_update_out", "")
                             .typed<void(at::TensorList, const at::Tensor&, const at::Tensor&)>();
  // bumped first: it refuses an inference tensor outside inference_mode, before anything is written
  torch::autograd::impl::bump_version(out);
  at::AutoDispatchBelowADInplaceOrView below;
  op.call(terms, coeffs, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(bespoke_ext, Autograd, m) {
  m.impl("rk_update_out", TORCH_FN(rk_update_out_autograd));
}
