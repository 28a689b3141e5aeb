// CPU kernels of the scaled Runge-Kutta ops (twins of cuda/rk_kernels.cu).
//
// Work is split into items: an item is one chunk (at most kReduceBlock elements) of one
// sample, so per-sample values (coefficient rows, RMS, incoming residual gradient) are
// constant inside an item. Items run in parallel (at::parallel_for, OpenMP); each writes its
// own partial sums, which are then added in a fixed order: results never depend on the
// number of threads. Inside an item, 256-element tiles are combined in a local float
// buffer; these loops have no aliasing and vectorise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../rk_common.h"
#include "../rk_ops.h"

namespace bespoke_ext {
namespace cpu {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kLanes = 8;                 // independent accumulators (vectorisable)
constexpr int64_t kGrainElements = 1 << 15;   // elements per parallel task, at least

template <typename scalar_t>
struct TermPtrs {
  const scalar_t* p[kMaxTerms];
  int k;
};

template <typename scalar_t>
TermPtrs<scalar_t> term_ptrs(const std::vector<at::Tensor>& ts) {
  TermPtrs<scalar_t> t{};
  t.k = static_cast<int>(ts.size());
  for (int j = 0; j < t.k; ++j) t.p[j] = ts[j].data_ptr<scalar_t>();
  return t;
}

struct Items {
  int64_t n, len, chunk, nb;  // samples, elements per sample, chunk length, chunks per sample
  int64_t total() const { return n * nb; }
};

Items make_items(const RkProblem& p) {
  Items it;
  it.n = p.n;
  it.len = p.len;
  it.chunk = std::max<int64_t>(1, std::min(p.len, kReduceBlock));
  it.nb = (p.len + it.chunk - 1) / it.chunk;
  return it;
}

// Calls f(item, sample, lo, hi) for every item, items in parallel.
template <typename F>
void parallel_items(const Items& it, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / it.chunk);
  at::parallel_for(0, it.total(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / it.nb;
      const int64_t c = item - s * it.nb;
      const int64_t lo = s * it.len + c * it.chunk;
      const int64_t hi = std::min(lo + it.chunk, (s + 1) * it.len);
      f(item, s, lo, hi);
    }
  });
}

// tmp[0:m) = sum_j c[j] * T_j[lo : lo + m)   (c already in the math type acc_t)
template <typename scalar_t, typename acc_t>
inline void combine_tile(const TermPtrs<scalar_t>& T, const acc_t* c, int64_t lo, int64_t m,
                         acc_t* tmp) {
  const scalar_t* t0 = T.p[0] + lo;
  const acc_t c0 = c[0];
  for (int64_t i = 0; i < m; ++i) tmp[i] = c0 * static_cast<acc_t>(t0[i]);
  for (int j = 1; j < T.k; ++j) {
    const scalar_t* tj = T.p[j] + lo;
    const acc_t cj = c[j];
    for (int64_t i = 0; i < m; ++i) tmp[i] += cj * static_cast<acc_t>(tj[i]);
  }
}

// lanes[l] += sum over i = l mod kLanes of a[i] * b[i]: a fixed-order, vectorisable dot.
template <typename scalar_t, typename acc_t>
inline void dot_tile(const acc_t* a, const scalar_t* b, int64_t m, acc_t* lanes) {
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * static_cast<acc_t>(b[i + l]);
  for (int64_t l = 0; i < m; ++i, ++l) lanes[l] += a[i] * static_cast<acc_t>(b[i]);
}

template <typename acc_t>
inline double sum_lanes(const acc_t* lanes) {
  double s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += static_cast<double>(lanes[l]);
  return s;
}

// Coefficient row of sample s, in the math type: [k] shared or row s of [N, k].
template <typename acc_t>
inline const acc_t* coeff_row(const acc_t* c, const RkProblem& p, int64_t s) {
  return p.per_sample ? c + s * p.k : c;
}

// Adds per-item partials [items, k] in a fixed order into per-sample [N, k] or shared [k].
at::Tensor reduce_coeff_partials(const at::Tensor& partials, const Items& it, const RkProblem& p,
                                 const at::Tensor& coeffs) {
  const double* part = partials.data_ptr<double>();
  const int64_t k = p.k;
  at::Tensor acc = at::zeros(p.per_sample ? std::vector<int64_t>{p.n, k} : std::vector<int64_t>{k},
                             coeffs.options().dtype(at::kDouble));
  double* out = acc.data_ptr<double>();
  if (p.per_sample) {
    at::parallel_for(0, it.n, 256, [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s)
        for (int64_t c = 0; c < it.nb; ++c)
          for (int64_t j = 0; j < k; ++j) out[s * k + j] += part[(s * it.nb + c) * k + j];
    });
  } else {
    for (int64_t item = 0; item < it.total(); ++item)
      for (int64_t j = 0; j < k; ++j) out[j] += part[item * k + j];
  }
  return acc.to(coeffs.scalar_type());
}

}  // namespace

void rk_update_out(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& out) {
  const char* op = "rk_update_out";
  const RkProblem p = check_rk_args(op, terms, coeffs);
  check_like_terms(op, "out", out, terms[0]);
  if (out.numel() == 0) return;
  const auto ts = contiguous_terms(terms);
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const bool direct = out.is_contiguous();
  at::Tensor dst = direct ? out : at::empty(out.sizes(), out.options());
  const Items it = make_items(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_update_out", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto T = term_ptrs<scalar_t>(ts);
    const acc_t* cp = c.data_ptr<acc_t>();
    scalar_t* o = dst.data_ptr<scalar_t>();
    parallel_items(it, [&](int64_t, int64_t s, int64_t lo, int64_t hi) {
      const acc_t* cs = coeff_row(cp, p, s);
      acc_t tmp[kTile];
      for (int64_t a = lo; a < hi; a += kTile) {
        const int64_t m = std::min(kTile, hi - a);
        combine_tile(T, cs, a, m, tmp);
        for (int64_t i = 0; i < m; ++i) o[a + i] = static_cast<scalar_t>(tmp[i]);
      }
    });
  });
  if (!direct) out.copy_(dst);
}

at::Tensor rk_update(at::TensorList terms, const at::Tensor& coeffs) {
  check_rk_args("rk_update", terms, coeffs);
  at::Tensor out = at::empty(terms[0].sizes(), terms[0].options());
  rk_update_out(terms, coeffs, out);
  return out;
}

at::Tensor rk_residual(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& target) {
  const char* op = "rk_residual";
  const RkProblem p = check_rk_args(op, terms, coeffs, /*need_leading_dim=*/true);
  check_like_terms(op, "target", target, terms[0]);
  const auto ts = contiguous_terms(terms);
  const at::Tensor tg = target.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const Items it = make_items(p);
  at::Tensor partial = at::empty({it.total()}, terms[0].options().dtype(at::kDouble));
  at::Tensor rms = at::empty({p.n}, terms[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto T = term_ptrs<scalar_t>(ts);
    const acc_t* cp = c.data_ptr<acc_t>();
    const scalar_t* y = tg.data_ptr<scalar_t>();
    double* part = partial.data_ptr<double>();
    parallel_items(it, [&](int64_t item, int64_t s, int64_t lo, int64_t hi) {
      const acc_t* cs = coeff_row(cp, p, s);
      acc_t tmp[kTile];
      acc_t lanes[kLanes] = {};
      for (int64_t a = lo; a < hi; a += kTile) {
        const int64_t m = std::min(kTile, hi - a);
        combine_tile(T, cs, a, m, tmp);
        for (int64_t i = 0; i < m; ++i) tmp[i] -= static_cast<acc_t>(y[a + i]);
        dot_tile(tmp, tmp, m, lanes);
      }
      part[item] = sum_lanes(lanes);
    });
    scalar_t* r = rms.data_ptr<scalar_t>();
    for (int64_t s = 0; s < p.n; ++s) {
      double ss = 0;
      for (int64_t cidx = 0; cidx < it.nb; ++cidx) ss += part[s * it.nb + cidx];
      // mean over zero elements is NaN, as in torch's mean()
      r[s] = static_cast<scalar_t>(std::sqrt(ss / static_cast<double>(p.len)));
    }
  });
  return rms;
}

// d/dT_j = c_j g;  d/dc_j = sum_i g_i T_j,i   (per sample or over all elements)
std::tuple<std::vector<at::Tensor>, at::Tensor> rk_update_backward(
    const at::Tensor& grad, at::TensorList terms, const at::Tensor& coeffs, bool need_terms,
    bool need_coeffs) {
  const char* op = "rk_update_backward";
  const RkProblem p = check_rk_args(op, terms, coeffs);
  check_like_terms(op, "grad", grad, terms[0]);
  const auto ts = contiguous_terms(terms);
  const at::Tensor g = grad.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const Items it = make_items(p);
  std::vector<at::Tensor> gterms;
  if (need_terms)
    for (int64_t j = 0; j < p.k; ++j) gterms.push_back(at::empty(terms[0].sizes(), terms[0].options()));
  at::Tensor partial = need_coeffs ? at::zeros({it.total(), p.k}, coeffs.options().dtype(at::kDouble))
                                   : at::Tensor();
  if (it.total() > 0 && (need_terms || need_coeffs)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_update_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto T = term_ptrs<scalar_t>(ts);
      const acc_t* cp = c.data_ptr<acc_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* go[kMaxTerms] = {};
      for (size_t j = 0; j < gterms.size(); ++j) go[j] = gterms[j].data_ptr<scalar_t>();
      double* part = need_coeffs ? partial.data_ptr<double>() : nullptr;
      parallel_items(it, [&](int64_t item, int64_t s, int64_t lo, int64_t hi) {
        const acc_t* cs = coeff_row(cp, p, s);
        acc_t gt[kTile];
        acc_t lanes[kMaxTerms][kLanes] = {};
        for (int64_t a = lo; a < hi; a += kTile) {
          const int64_t m = std::min(kTile, hi - a);
          for (int64_t i = 0; i < m; ++i) gt[i] = static_cast<acc_t>(gp[a + i]);
          for (int j = 0; j < T.k; ++j) {
            if (need_terms) {
              const acc_t cj = cs[j];
              scalar_t* dst = go[j] + a;
              for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<scalar_t>(cj * gt[i]);
            }
            if (need_coeffs) dot_tile(gt, T.p[j] + a, m, lanes[j]);
          }
        }
        if (need_coeffs)
          for (int j = 0; j < T.k; ++j) part[item * p.k + j] = sum_lanes(lanes[j]);
      });
    });
  }
  at::Tensor gcoeffs;
  if (need_coeffs) {
    gcoeffs = reduce_coeff_partials(partial, it, p, coeffs);
  } else {
    gcoeffs = at::empty({0}, coeffs.options());
  }
  return {gterms, gcoeffs};
}

// r = sum_j c_j T_j - y, rms = sqrt(mean r^2):  d rms / d r_i = r_i / (len * rms)
// so with g_r = grad[n] r / (len rms[n]):  dT_j = c_j g_r, dy = -g_r, dc_j = sum_i g_r T_j.
// At rms = 0 (a perfect fit) the gradient is taken as 0, the minimum-norm subgradient.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> rk_residual_backward(
    const at::Tensor& grad, const at::Tensor& rms, at::TensorList terms, const at::Tensor& coeffs,
    const at::Tensor& target, bool need_terms, bool need_coeffs, bool need_target) {
  const char* op = "rk_residual_backward";
  const RkProblem p = check_rk_args(op, terms, coeffs, /*need_leading_dim=*/true);
  check_like_terms(op, "target", target, terms[0]);
  check_per_sample(op, "grad", grad, p, terms[0]);
  check_per_sample(op, "rms", rms, p, terms[0]);
  const auto ts = contiguous_terms(terms);
  const at::Tensor tg = target.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const at::ScalarType acc = acc_dtype(p.dtype);
  // per-sample factor grad[n] / (len * rms[n]), in the math type
  const at::Tensor rms_acc = rms.to(acc);
  at::Tensor scale = at::where(rms_acc > 0, grad.to(acc) / (rms_acc * static_cast<double>(p.len)),
                               at::zeros_like(rms_acc))
                         .contiguous();
  const Items it = make_items(p);
  std::vector<at::Tensor> gterms;
  if (need_terms)
    for (int64_t j = 0; j < p.k; ++j) gterms.push_back(at::empty(terms[0].sizes(), terms[0].options()));
  at::Tensor gtarget = need_target ? at::empty(terms[0].sizes(), terms[0].options())
                                   : at::empty({0}, terms[0].options());
  at::Tensor partial = need_coeffs ? at::zeros({it.total(), p.k}, coeffs.options().dtype(at::kDouble))
                                   : at::Tensor();
  if (it.total() > 0 && (need_terms || need_coeffs || need_target)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto T = term_ptrs<scalar_t>(ts);
      const acc_t* cp = c.data_ptr<acc_t>();
      const acc_t* sc = scale.data_ptr<acc_t>();
      const scalar_t* y = tg.data_ptr<scalar_t>();
      scalar_t* go[kMaxTerms] = {};
      for (size_t j = 0; j < gterms.size(); ++j) go[j] = gterms[j].data_ptr<scalar_t>();
      scalar_t* gy = need_target ? gtarget.data_ptr<scalar_t>() : nullptr;
      double* part = need_coeffs ? partial.data_ptr<double>() : nullptr;
      parallel_items(it, [&](int64_t item, int64_t s, int64_t lo, int64_t hi) {
        const acc_t* cs = coeff_row(cp, p, s);
        const acc_t f = sc[s];
        acc_t gr[kTile];
        acc_t lanes[kMaxTerms][kLanes] = {};
        for (int64_t a = lo; a < hi; a += kTile) {
          const int64_t m = std::min(kTile, hi - a);
          combine_tile(T, cs, a, m, gr);
          for (int64_t i = 0; i < m; ++i) gr[i] = f * (gr[i] - static_cast<acc_t>(y[a + i]));
          if (need_target)
            for (int64_t i = 0; i < m; ++i) gy[a + i] = static_cast<scalar_t>(-gr[i]);
          for (int j = 0; j < T.k; ++j) {
            if (need_terms) {
              const acc_t cj = cs[j];
              scalar_t* dst = go[j] + a;
              for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<scalar_t>(cj * gr[i]);
            }
            if (need_coeffs) dot_tile(gr, T.p[j] + a, m, lanes[j]);
          }
        }
        if (need_coeffs)
          for (int j = 0; j < T.k; ++j) part[item * p.k + j] = sum_lanes(lanes[j]);
      });
    });
  }
  at::Tensor gcoeffs = need_coeffs ? reduce_coeff_partials(partial, it, p, coeffs)
                                   : at::empty({0}, coeffs.options());
  return {gterms, gcoeffs, gtarget};
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(bespoke_ext, CPU, m) {
  m.impl("rk_update", &cpu::rk_update);
  m.impl("rk_update_out", &cpu::rk_update_out);
  m.impl("rk_residual", &cpu::rk_residual);
  m.impl("rk_update_backward", &cpu::rk_update_backward);
  m.impl("rk_residual_backward", &cpu::rk_residual_backward);
}

}  // namespace bespoke_ext
