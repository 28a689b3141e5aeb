// CPU kernels of the scaled Runge-Kutta ops (twins of cuda/rk_kernels.cu).
//
// How work is split does not depend on how elements are grouped into samples:
//   - elementwise work (the update, gradients of terms) runs over flat ranges of whole tiles;
//   - reductions run over units fixed by the shape alone, never by the thread count (see
//     Units), each unit summed by one thread in a fixed order, then the units' partial sums
//     are added in a fixed order: the same bits at every thread count, every run.
// The loops over one range are in rk_tiles.h, compiled for two instruction sets.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "../rk_common.h"
#include "../rk_ops.h"

namespace bespoke_ext {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;       // elements combined in a local buffer (fits L1 with k inputs)
constexpr int64_t kGrain = 1 << 15;  // elements per parallel task, at least (as TensorIterator)
constexpr int64_t kShortLen = 8;     // samples shorter than this are tiled whole (rk_tiles.h)

// Pointers and per-sample layout of one call; what an op does not use stays null.
template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* term[kMaxTerms] = {};
  int64_t k = 0;
  int64_t len = 1;                // elements per sample
  bool per_sample = false;        // c is [N, k] rather than [k]
  const acc_t* c = nullptr;       // coefficients in the math type
  scalar_t* out = nullptr;        // rk_update
  const scalar_t* y = nullptr;    // residual target
  const scalar_t* grad = nullptr; // incoming gradient of rk_update
  const acc_t* scale = nullptr;   // [N] factor of the residual gradient
  scalar_t* gterm[kMaxTerms] = {};
  scalar_t* gy = nullptr;         // gradient of the target
  int64_t tile = kTile;           // elements per tile: whole samples when they are short
};

// Elements per tile: kTile, or whole samples of a short length.
inline int64_t tile_for(int64_t len) { return len < kShortLen ? (kTile / len) * len : kTile; }

template <typename scalar_t, typename acc_t>
Args<scalar_t, acc_t> make_args(const RkProblem& p, const std::vector<at::Tensor>& terms,
                                const at::Tensor& c) {
  Args<scalar_t, acc_t> a;
  a.k = p.k;
  a.len = std::max<int64_t>(p.len, 1);
  a.per_sample = p.per_sample;
  a.c = c.data_ptr<acc_t>();
  for (int64_t j = 0; j < p.k; ++j) a.term[j] = terms[j].data_ptr<scalar_t>();
  a.tile = tile_for(a.len);
  return a;
}

// Two builds of the same loops: the baseline one and one with AVX2 (8 floats per register) and
// F16C (float16 conversions), chosen at run time. No FMA in either, so they give the same bits.
namespace base {
#include "rk_tiles.h"
}  // namespace base
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BX_CPU_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif
#define BX_TILES_F16C 1
namespace avx2 {
#include "rk_tiles.h"
}  // namespace avx2
#undef BX_TILES_F16C
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

inline bool cpu_has_avx2() {
#ifdef BX_CPU_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

#ifdef BX_CPU_AVX2
#define BX_CPU_ISA(fn, ...) (cpu_has_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define BX_CPU_ISA(fn, ...) base::fn(__VA_ARGS__)
#endif

// Reduction units, fixed by the shape. Per-sample sums (RMS, per-sample coefficient
// gradients): a unit is a group of whole samples of about kReduceBlock elements, or, for
// samples longer than that, one kReduceBlock chunk of one sample. Shared-coefficient
// gradients: a unit is about kReduceBlock flat elements (whole tiles), whatever the samples. A unit owns `slots`
// sums from `slot(u)` on; a sample's sum is the sum of its nb slots, in order.
struct Units {
  int64_t n = 0, len = 1, numel = 0;
  bool flat = false;
  int64_t spu = 1;  // whole samples per unit (per-sample units with len <= kReduceBlock)
  int64_t nb = 1;   // chunks per sample (per-sample units with len > kReduceBlock)
  int64_t block = kReduceBlock;  // elements per flat unit
  int64_t count = 0;

  static Units make(const RkProblem& p, bool flat) {
    Units u;
    u.n = p.n;
    u.len = std::max<int64_t>(p.len, 1);
    u.numel = p.n * p.len;
    u.flat = flat;
    if (u.numel == 0) return u;
    if (flat) {
      u.block = (kReduceBlock / kTile) * tile_for(u.len);  // whole tiles (of whole short samples)
      u.count = (u.numel + u.block - 1) / u.block;
    } else if (u.len <= kReduceBlock) {
      u.spu = kReduceBlock / u.len;
      u.count = (u.n + u.spu - 1) / u.spu;
    } else {
      u.nb = (u.len + kReduceBlock - 1) / kReduceBlock;
      u.count = u.n * u.nb;
    }
    return u;
  }
  int64_t slots_total() const { return flat ? count : n * nb; }
  int64_t slot(int64_t u) const { return (flat || nb > 1) ? u : u * spu; }
  int64_t slots(int64_t u) const {
    return (flat || nb > 1) ? 1 : std::min(spu, n - u * spu);
  }
  std::pair<int64_t, int64_t> range(int64_t u) const {
    if (flat) return {u * block, std::min(numel, (u + 1) * block)};
    if (nb == 1) return {u * spu * len, std::min(n, (u + 1) * spu) * len};
    const int64_t s = u / nb, c = u - s * nb;
    return {s * len + c * kReduceBlock, std::min((s + 1) * len, s * len + (c + 1) * kReduceBlock)};
  }
};

// Runs f(lo, hi, sums) for every unit in parallel; `sums` (P values per slot, zeroed here)
// is the unit's own part of `partial` [slots_total, P].
template <typename F>
void parallel_units(const Units& u, int64_t P, double* partial, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / kReduceBlock);
  at::parallel_for(0, u.count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* sums = partial == nullptr ? nullptr : partial + u.slot(i) * P;
      if (sums != nullptr) std::fill(sums, sums + u.slots(i) * P, 0.0);
      const auto [lo, hi] = u.range(i);
      f(lo, hi, sums);
    }
  });
}

// Coefficient gradients from partials [slots_total, k], added in a fixed order: per sample
// [N, k] (a sample's nb chunks) or shared [k] (all units).
at::Tensor finish_coeff_grad(const at::Tensor& partial, const Units& u, const RkProblem& p,
                             const at::Tensor& coeffs) {
  const double* part = partial.data_ptr<double>();
  const int64_t k = p.k;
  at::Tensor acc = at::zeros(p.per_sample ? std::vector<int64_t>{p.n, k} : std::vector<int64_t>{k},
                             coeffs.options().dtype(at::kDouble));
  double* out = acc.data_ptr<double>();
  if (u.count == 0) return acc.to(coeffs.scalar_type());
  if (p.per_sample) {
    at::parallel_for(0, p.n, kGrain / std::max<int64_t>(1, k * u.nb), [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s)
        for (int64_t c = 0; c < u.nb; ++c)
          for (int64_t j = 0; j < k; ++j) out[s * k + j] += part[(s * u.nb + c) * k + j];
    });
  } else {
    for (int64_t i = 0; i < u.count; ++i)
      for (int64_t j = 0; j < k; ++j) out[j] += part[i * k + j];
  }
  return acc.to(coeffs.scalar_type());
}

// Runs a backward op's backward(lo, hi, sums) over every unit and returns the coefficient
// gradient ([N, k] or [k]; 0 elements when not asked for). Per-sample coefficients whose samples
// each lie inside one unit (nb == 1): a unit's sums are final, so each task sums its units in a
// scratch buffer and writes them straight into the [N, k] result; an [N, k] buffer of double
// partials would add three passes over N k values (zeroing, the partials, the conversion), most
// of the time for samples of a few elements. Otherwise: partials [slots_total, k], added in order
// by finish_coeff_grad. The same bits either way: a sample's sum is its one slot, converted once.
template <typename F>
at::Tensor backward_over_units(const Units& u, const RkProblem& p, const at::Tensor& coeffs, bool need_coeffs,
                               const F& backward) {
  if (!need_coeffs) {
    parallel_units(u, p.k, nullptr, backward);
    return at::empty({0}, coeffs.options());
  }
  if (p.per_sample && u.nb == 1 && u.count > 0) {
    at::Tensor gc = at::empty({p.n, p.k}, coeffs.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "coeff_grad", [&] {
      scalar_t* out = gc.data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, kGrain / kReduceBlock);
      at::parallel_for(0, u.count, grain, [&](int64_t begin, int64_t end) {
        std::vector<double> sums(u.spu * p.k);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t m = u.slots(i) * p.k;
          std::fill(sums.begin(), sums.begin() + m, 0.0);
          const auto [lo, hi] = u.range(i);
          backward(lo, hi, sums.data());
          scalar_t* o = out + u.slot(i) * p.k;
          for (int64_t q = 0; q < m; ++q) o[q] = static_cast<scalar_t>(sums[q]);
        }
      });
    });
    return gc;
  }
  at::Tensor partial = at::empty({u.slots_total(), p.k}, coeffs.options().dtype(at::kDouble));
  parallel_units(u, p.k, partial.data_ptr<double>(), backward);
  return finish_coeff_grad(partial, u, p, coeffs);
}

// The combination into a contiguous destination, in parallel over whole tiles.
void update_into(const RkProblem& p, const std::vector<at::Tensor>& ts, const at::Tensor& c,
                 const at::Tensor& dst) {
  const int64_t numel = dst.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, acc_t>(p, ts, c);
    a.out = dst.data_ptr<scalar_t>();
    const int64_t tiles = (numel + a.tile - 1) / a.tile;
    at::parallel_for(0, tiles, kGrain / kTile, [&](int64_t b, int64_t e) {
      BX_CPU_ISA(update_range, a, b * a.tile, std::min(numel, e * a.tile));
    });
  });
}

}  // namespace

void rk_update_out(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& out) {
  update_out(terms, coeffs, out, update_into);
}

at::Tensor rk_update(at::TensorList terms, const at::Tensor& coeffs) {
  return update(terms, coeffs, update_into);
}

at::Tensor rk_residual(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& target) {
  const char* op = "rk_residual";
  const RkProblem p = check_rk_args(op, terms, coeffs, /*need_leading_dim=*/true);
  check_like_terms(op, "target", target, terms[0]);
  const auto ts = contiguous_terms(terms);
  const at::Tensor tg = target.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const Units u = Units::make(p, /*flat=*/false);
  at::Tensor rms = at::empty({p.n}, terms[0].options());
  if (u.count == 0) return rms.fill_(std::numeric_limits<double>::quiet_NaN());  // mean of no elements
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, acc_t>(p, ts, c);
    a.y = tg.data_ptr<scalar_t>();
    scalar_t* r = rms.data_ptr<scalar_t>();
    if (p.len == 1) {
      // one element per sample ([N] or [N, 1]): elementwise over flat tiles (the per-sample sums and their
      // unit buffers cost as much again as the combination)
      at::parallel_for(0, (p.n + a.tile - 1) / a.tile, kGrain / kTile, [&](int64_t b, int64_t e) {
        BX_CPU_ISA(residual_single_range, a, b * a.tile, std::min(p.n, e * a.tile), r);
      });
      return;
    }
    if (u.nb == 1) {
      // every sample lies inside one unit: the unit turns its own sums into RMS, in a scratch
      // buffer of its task (an [N] buffer of partial sums would cost a pass and page faults)
      const int64_t grain = std::max<int64_t>(1, kGrain / kReduceBlock);
      at::parallel_for(0, u.count, grain, [&](int64_t begin, int64_t end) {
        std::vector<double> sums(u.spu);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t m = u.slots(i);
          std::fill(sums.begin(), sums.begin() + m, 0.0);
          const auto [lo, hi] = u.range(i);
          BX_CPU_ISA(residual_range, a, lo, hi, sums.data());
          BX_CPU_ISA(rms_from_sums, r + u.slot(i), sums.data(), m, p.len);
        }
      });
      return;
    }
    // long samples: nb chunk sums per sample, added in order
    at::Tensor partial = at::empty({u.slots_total()}, terms[0].options().dtype(at::kDouble));
    double* part = partial.data_ptr<double>();
    parallel_units(u, 1, part, [&](int64_t lo, int64_t hi, double* sums) {
      BX_CPU_ISA(residual_range, a, lo, hi, sums);
    });
    at::parallel_for(0, p.n, std::max<int64_t>(1, kGrain / u.nb), [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; ++s) {
        double ss = 0;
        for (int64_t ch = 0; ch < u.nb; ++ch) ss += part[s * u.nb + ch];
        BX_CPU_ISA(rms_from_sums, r + s, &ss, 1, p.len);
      }
    });
  });
  return rms;
}

// Formulas and checks: prepare_update_backward (rk_common.h).
std::tuple<std::vector<at::Tensor>, at::Tensor> rk_update_backward(
    const at::Tensor& grad, at::TensorList terms, const at::Tensor& coeffs, bool need_terms,
    bool need_coeffs) {
  UpdateBackward b = prepare_update_backward(grad, terms, coeffs, need_terms);
  const RkProblem& p = b.p;
  const Units u = Units::make(p, /*flat=*/!p.per_sample);
  at::Tensor gcoeffs = at::empty({0}, coeffs.options());
  if (!need_terms && !need_coeffs) return {b.gterms, gcoeffs};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_update_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, acc_t>(p, b.terms, b.coeffs);
    a.grad = b.grad.data_ptr<scalar_t>();
    for (size_t j = 0; j < b.gterms.size(); ++j) a.gterm[j] = b.gterms[j].data_ptr<scalar_t>();
    gcoeffs = backward_over_units(u, p, coeffs, need_coeffs, [&](int64_t lo, int64_t hi, double* sums) {
      BX_CPU_ISA(backward_range, a, /*residual=*/false, lo, hi, sums);
    });
  });
  return {b.gterms, gcoeffs};
}

// Formulas and checks: prepare_residual_backward (rk_common.h).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> rk_residual_backward(
    const at::Tensor& grad, const at::Tensor& rms, at::TensorList terms, const at::Tensor& coeffs,
    const at::Tensor& target, bool need_terms, bool need_coeffs, bool need_target) {
  ResidualBackward b = prepare_residual_backward(grad, rms, terms, coeffs, target, need_terms, need_target);
  const RkProblem& p = b.p;
  const Units u = Units::make(p, /*flat=*/!p.per_sample);
  at::Tensor gcoeffs = at::empty({0}, coeffs.options());
  if (!need_terms && !need_coeffs && !need_target) return {b.gterms, gcoeffs, b.gtarget};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t, acc_t>(p, b.terms, b.coeffs);
    a.y = b.target.data_ptr<scalar_t>();
    a.scale = b.scale.data_ptr<acc_t>();
    for (size_t j = 0; j < b.gterms.size(); ++j) a.gterm[j] = b.gterms[j].data_ptr<scalar_t>();
    a.gy = need_target ? b.gtarget.data_ptr<scalar_t>() : nullptr;
    gcoeffs = backward_over_units(u, p, coeffs, need_coeffs, [&](int64_t lo, int64_t hi, double* sums) {
      BX_CPU_ISA(backward_range, a, /*residual=*/true, lo, hi, sums);
    });
  });
  return {b.gterms, gcoeffs, b.gtarget};
}

}  // namespace cpu

BX_REGISTER_RK_OPS(CPU, cpu)

}  // namespace bespoke_ext
