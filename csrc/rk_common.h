// Shared host-side logic of the scaled Runge-Kutta ops: argument checks and the
// description of one problem (how many samples, how many elements per sample,
// whether coefficients are shared or per sample). CPU and CUDA kernels both start here,
// so every error message is the same on every device.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <torch/types.h>

#include <vector>

namespace bespoke_ext {

// Kernels pass term pointers by value (CUDA: one kernel parameter struct, 2 x 8 x kMaxTerms
// bytes, well under the 4 KiB parameter limit). 128 covers RK updates (2-3 terms), Hermite
// interpolation (4) and non-stationary solvers, which combine NFE + 1 terms (65 at NFE 64).
constexpr int64_t kMaxTerms = 128;

// Fixed reduction block (elements per partial sum). Partial sums are added in a fixed
// order afterwards, so coefficient gradients and RMS values do not depend on the number
// of threads: the same bits every run.
constexpr int64_t kReduceBlock = 16384;

#define BX_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

struct RkProblem {
  int64_t k = 0;          // number of terms
  int64_t n = 1;          // samples (leading dimension; 1 for 0-dim terms)
  int64_t len = 1;        // elements per sample
  bool per_sample = false;  // coeffs is [n, k] rather than [k]
  at::ScalarType dtype;   // terms' dtype
};

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline bool is_supported_term_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks terms against each other and coeffs against the terms; returns the problem's
// shape. `op` names the op in messages.
inline RkProblem check_rk_args(const char* op, at::TensorList terms, const at::Tensor& coeffs,
                               bool need_leading_dim = false) {
  RkProblem p;
  p.k = static_cast<int64_t>(terms.size());
  BX_CHECK(p.k >= 1, op, ": `terms` must hold at least one tensor, got an empty list");
  BX_CHECK(p.k <= kMaxTerms, op, ": at most ", kMaxTerms, " terms are supported, got ", p.k);
  const at::Tensor& t0 = terms[0];
  BX_CHECK(t0.defined(), op, ": terms[0] is undefined");
  p.dtype = t0.scalar_type();
  BX_CHECK(is_supported_term_dtype(p.dtype), op,
           ": terms must be float16, bfloat16, float32 or float64, got terms[0] of dtype ",
           dtype_name(p.dtype));
  if (need_leading_dim) {
    BX_CHECK(t0.dim() >= 1, op,
             ": terms must have a leading sample dimension [N, ...], got a 0-dim tensor");
  }
  for (int64_t j = 1; j < p.k; ++j) {
    const at::Tensor& tj = terms[j];
    BX_CHECK(tj.defined(), op, ": terms[", j, "] is undefined");
    BX_CHECK(tj.sizes() == t0.sizes(), op, ": all terms must share one shape; terms[0] has shape ",
             t0.sizes(), " but terms[", j, "] has shape ", tj.sizes());
    BX_CHECK(tj.scalar_type() == p.dtype, op, ": all terms must share one dtype; terms[0] is ",
             dtype_name(p.dtype), " but terms[", j, "] is ", dtype_name(tj.scalar_type()));
    BX_CHECK(tj.device() == t0.device(), op, ": all terms must be on one device; terms[0] is on ",
             t0.device(), " but terms[", j, "] is on ", tj.device());
  }
  if (t0.dim() >= 1) {
    p.n = t0.size(0);
    p.len = 1;
    for (int64_t d = 1; d < t0.dim(); ++d) p.len *= t0.size(d);
  }

  BX_CHECK(coeffs.defined(), op, ": `coeffs` is undefined");
  BX_CHECK(coeffs.scalar_type() == at::kFloat || coeffs.scalar_type() == at::kDouble, op,
           ": `coeffs` must be float32 or float64, got ", dtype_name(coeffs.scalar_type()));
  BX_CHECK(coeffs.device() == t0.device(), op, ": `coeffs` must be on the terms' device (",
           t0.device(), "), got ", coeffs.device());
  if (coeffs.dim() == 1) {
    BX_CHECK(coeffs.size(0) == p.k, op, ": `coeffs` of shape [k] must have k = len(terms) = ", p.k,
             " entries, got shape ", coeffs.sizes());
    p.per_sample = false;
  } else if (coeffs.dim() == 2) {
    BX_CHECK(t0.dim() >= 1, op,
             ": per-sample `coeffs` [N, k] need terms with a leading dimension, got 0-dim terms");
    BX_CHECK(coeffs.size(0) == p.n && coeffs.size(1) == p.k, op,
             ": per-sample `coeffs` must have shape [N, k] = [", p.n, ", ", p.k, "], got ",
             coeffs.sizes());
    p.per_sample = true;
  } else {
    BX_CHECK(false, op, ": `coeffs` must have shape [k] or [N, k] (k = ", p.k, ", N = ", p.n,
             "), got shape ", coeffs.sizes());
  }
  return p;
}

// A tensor that must match the terms exactly (target, out, incoming gradient).
inline void check_like_terms(const char* op, const char* name, const at::Tensor& x,
                             const at::Tensor& t0) {
  BX_CHECK(x.defined(), op, ": `", name, "` is undefined");
  BX_CHECK(x.sizes() == t0.sizes(), op, ": `", name, "` must have the terms' shape ", t0.sizes(),
           ", got ", x.sizes());
  BX_CHECK(x.scalar_type() == t0.scalar_type(), op, ": `", name, "` must have the terms' dtype ",
           dtype_name(t0.scalar_type()), ", got ", dtype_name(x.scalar_type()));
  BX_CHECK(x.device() == t0.device(), op, ": `", name, "` must be on the terms' device ",
           t0.device(), ", got ", x.device());
}

// `out` is written while the terms are read. Writing straight into a term (out is terms[j],
// the same elements in the same layout) is safe for the first kInPlaceTerms terms: the CPU kernel
// combines terms in groups of four or more, reading a group's terms at element i before it writes
// the partial sum there, so a term of the first group is read before `out` changes and a later one
// would be read after (a CUDA thread reads every term of its element before writing it). Any other
// overlap would let a write land on an element that is still to be read, so it is refused. (Strided
// inputs are copied and a strided `out` is computed in a buffer first, so only dense tensors can
// overlap here, which get_overlap_status decides exactly.) Returns whether `out` is one of the later
// terms, which update_out then combines in a buffer first.
constexpr size_t kInPlaceTerms = 4;

inline bool check_out_overlap(const char* op, const at::Tensor& out, at::TensorList terms) {
  bool late_term = false;
  for (size_t j = 0; j < terms.size(); ++j) {
    const at::MemOverlapStatus overlap = at::get_overlap_status(out, terms[j]);
    BX_CHECK(overlap != at::MemOverlapStatus::Partial, op,
             ": `out` partially overlaps terms[", j, "] in memory (shape ", out.sizes(),
             ", strides ", out.strides(), " against strides ", terms[j].strides(),
             "); pass a separate buffer, or terms[", j, "] itself to update it in place");
    late_term = late_term || (j >= kInPlaceTerms && overlap == at::MemOverlapStatus::Full);
  }
  return late_term;
}

// Per-sample vectors (residual output and its incoming gradient): shape [N].
inline void check_per_sample(const char* op, const char* name, const at::Tensor& v,
                             const RkProblem& p, const at::Tensor& like) {
  BX_CHECK(v.defined(), op, ": `", name, "` is undefined");
  BX_CHECK(v.dim() == 1 && v.size(0) == p.n, op, ": `", name, "` must have shape [N] = [", p.n,
           "], got ", v.sizes());
  BX_CHECK(v.device() == like.device(), op, ": `", name, "` must be on the terms' device ",
           like.device(), ", got ", v.device());
  BX_CHECK(v.is_floating_point(), op, ": `", name, "` must be floating point, got ",
           dtype_name(v.scalar_type()));
}

// Contiguous views of the inputs (a copy only where an input is strided).
inline std::vector<at::Tensor> contiguous_terms(at::TensorList terms) {
  std::vector<at::Tensor> out;
  out.reserve(terms.size());
  for (const auto& t : terms) out.push_back(t.contiguous());
  return out;
}

// Math type: float32 for float16/bfloat16/float32 terms, float64 for float64 terms.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Coefficients in the math type, contiguous, as [rows, k] with rows = 1 when shared.
inline at::Tensor coeffs_for_math(const at::Tensor& coeffs, const RkProblem& p) {
  const at::ScalarType acc = acc_dtype(p.dtype);
  // the usual case without a dispatcher call: the executor hands over tables already in the math type
  if (coeffs.scalar_type() == acc && coeffs.is_contiguous()) return coeffs;
  return coeffs.to(acc).contiguous();
}

// Host logic of rk_update_out on every device: checks, then
// update_into(problem, contiguous terms, math-type coeffs, contiguous destination), writing
// straight into `out` or, when it is strided or one of the later terms, into a buffer then copied into it.
template <typename UpdateInto>
void update_out(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& out,
                const UpdateInto& update_into) {
  const char* op = "rk_update_out";
  const RkProblem p = check_rk_args(op, terms, coeffs);
  check_like_terms(op, "out", out, terms[0]);
  const bool late_term = check_out_overlap(op, out, terms);
  if (out.numel() == 0) return;
  const auto ts = contiguous_terms(terms);
  // `out` may also hold the coefficients (a caller's buffer reused): they are read per tile, after
  // earlier tiles were written, so they are copied first
  const at::Tensor c = at::get_overlap_status(out, coeffs) == at::MemOverlapStatus::No
                           ? coeffs_for_math(coeffs, p)
                           : coeffs_for_math(coeffs, p).clone();
  if (out.is_contiguous() && !late_term) {
    update_into(p, ts, c, out);
  } else {
    const at::Tensor dst = at::empty(out.sizes(), out.options());
    update_into(p, ts, c, dst);
    out.copy_(dst);
  }
}

// Host logic of rk_update (allocating) on every device.
template <typename UpdateInto>
at::Tensor update(at::TensorList terms, const at::Tensor& coeffs, const UpdateInto& update_into) {
  const RkProblem p = check_rk_args("rk_update", terms, coeffs);
  at::Tensor out = at::empty(terms[0].sizes(), terms[0].options());
  if (out.numel() > 0) update_into(p, contiguous_terms(terms), coeffs_for_math(coeffs, p), out);
  return out;
}

// Gradient buffers for the k terms (none when they are not asked for).
inline std::vector<at::Tensor> empty_term_grads(const RkProblem& p, const at::Tensor& t0, bool need) {
  std::vector<at::Tensor> g;
  if (need) {
    g.reserve(p.k);
    for (int64_t j = 0; j < p.k; ++j) g.push_back(at::empty(t0.sizes(), t0.options()));
  }
  return g;
}

// What both backward ops start from, after their checks: the terms and coefficients ready
// for the kernels and the buffers of the terms' gradients.
struct BackwardInputs {
  RkProblem p;
  std::vector<at::Tensor> terms;   // contiguous
  at::Tensor coeffs;               // math type, contiguous
  std::vector<at::Tensor> gterms;  // outputs (empty list when not asked for)

  BackwardInputs(const RkProblem& problem, at::TensorList ts, const at::Tensor& c, bool need_terms)
      : p(problem),
        terms(contiguous_terms(ts)),
        coeffs(coeffs_for_math(c, problem)),
        gterms(empty_term_grads(problem, ts[0], need_terms)) {}
};

// Host prologue of rk_update_backward, the same on every device.
//   out = sum_j c_j T_j:  dT_j = c_j g,  dc_j = sum_i g_i T_j,i  (per sample or over all elements)
struct UpdateBackward : BackwardInputs {
  at::Tensor grad;  // contiguous
  using BackwardInputs::BackwardInputs;
};

inline UpdateBackward prepare_update_backward(const at::Tensor& grad, at::TensorList terms,
                                              const at::Tensor& coeffs, bool need_terms) {
  const char* op = "rk_update_backward";
  const RkProblem p = check_rk_args(op, terms, coeffs);
  check_like_terms(op, "grad", grad, terms[0]);
  UpdateBackward b(p, terms, coeffs, need_terms);
  b.grad = grad.contiguous();
  return b;
}

// Host prologue of rk_residual_backward, the same on every device: checks, contiguous
// inputs, output buffers and the per-sample factor of the gradient.
//   r = sum_j c_j T_j - y, rms = sqrt(mean r^2):  d rms / d r_i = r_i / (len * rms)
// so with g_r = grad[n] r / (len rms[n]):  dT_j = c_j g_r, dy = -g_r, dc_j = sum_i g_r T_j.
// At rms = 0 (a perfect fit) the gradient is taken as 0, the minimum-norm subgradient.
struct ResidualBackward : BackwardInputs {
  at::Tensor target;   // contiguous
  at::Tensor scale;    // [N] grad[n] / (len rms[n]) in the math type, 0 where rms = 0
  at::Tensor gtarget;  // output (0 elements when not asked for)
  using BackwardInputs::BackwardInputs;
};

inline ResidualBackward prepare_residual_backward(const at::Tensor& grad, const at::Tensor& rms,
                                                  at::TensorList terms, const at::Tensor& coeffs,
                                                  const at::Tensor& target, bool need_terms,
                                                  bool need_target) {
  const char* op = "rk_residual_backward";
  const RkProblem p = check_rk_args(op, terms, coeffs, /*need_leading_dim=*/true);
  check_like_terms(op, "target", target, terms[0]);
  check_per_sample(op, "grad", grad, p, terms[0]);
  check_per_sample(op, "rms", rms, p, terms[0]);
  ResidualBackward b(p, terms, coeffs, need_terms);
  b.target = target.contiguous();
  const at::Tensor rms_acc = rms.to(acc_dtype(p.dtype));
  b.scale = at::where(rms_acc > 0, grad.to(rms_acc.scalar_type()) / (rms_acc * static_cast<double>(p.len)),
                      at::zeros_like(rms_acc))
                .contiguous();
  b.gtarget = need_target ? at::empty(terms[0].sizes(), terms[0].options())
                          : at::empty({0}, terms[0].options());
  return b;
}

}  // namespace bespoke_ext
