// Operator schemas of the bespoke_ext namespace: defined once, here. Kernels register
// implementations per device (cpu/rk_kernels.cpp, cuda/rk_kernels.cu); fake kernels and
// autograd are registered from Python (bespoke_ext/ops.py).
//
//   rk_update(terms, coeffs)            out  = sum_j c[.., j] * terms[j]
//   rk_update_out(terms, coeffs, out)   the same, written into `out` (no allocation, no autograd)
//   rk_residual(terms, coeffs, target)  rms[n] = sqrt(mean_i (sum_j c[n?, j] terms[j][n, i] - target[n, i])^2)
//   rk_update_backward / rk_residual_backward: gradients for every input in one pass;
//   coefficient gradients are reduced in a fixed order (the same bits every run).
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

// rk_update_out writes into `out` and has no gradient (its schema says so): autograd passes it
// straight to the device kernel. The default autograd fallback would box every call to check
// for inputs that require grad, the one cost of a small update that does not scale with its size.
TORCH_LIBRARY_IMPL(bespoke_ext, Autograd, m) {
  m.impl("rk_update_out", torch::CppFunction::makeFallthrough());
}
