// CUDA kernels of the scaled Runge-Kutta ops (twins of cpu/rk_kernels.cpp, same names).
//
// - rk_update / rk_update_out: one elementwise pass, 16-byte vector loads and stores with a
//   scalar tail, 64-bit indices, grid-stride loop on the current stream.
// - reductions (residual RMS, coefficient gradients): two stages. Stage 1 gives every item
//   (one chunk of one sample) to one thread block, which reduces it with a fixed shared-memory
//   tree; stage 2 adds the per-item partials of each output in a fixed order. No atomics, no
//   host synchronisation: the same bits every run, and capturable in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../rk_common.h"
#include "../rk_ops.h"

namespace bespoke_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

template <typename scalar_t>
struct TermPtrs {
  const scalar_t* p[kMaxTerms];
};

template <typename scalar_t>
struct OutPtrs {
  scalar_t* p[kMaxTerms];
};

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t>
TermPtrs<scalar_t> term_ptrs(const std::vector<at::Tensor>& ts) {
  TermPtrs<scalar_t> t{};
  for (size_t j = 0; j < ts.size(); ++j) t.p[j] = ts[j].data_ptr<scalar_t>();
  return t;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// out[i] = sum_j c[s(i), j] T_j[i], VEC elements per thread (VEC = 1: scalar path).
// With per-sample coefficients (cstride = k) the vector path needs len % VEC == 0 so that
// a vector never straddles two samples. `out` may alias a term (same-index reads first).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void update_kernel(TermPtrs<scalar_t> T, int k, const acc_t* __restrict__ c,
                              int64_t cstride, int64_t len, int64_t numel, scalar_t* out) {
  using P = Pack<scalar_t, VEC>;
  const int64_t nvec = numel / VEC;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = tid; v < nvec; v += stride) {
    const int64_t i = v * VEC;
    const acc_t* cs = c + (cstride ? (i / len) * cstride : 0);
    acc_t acc[VEC];
    {
      const P t = *reinterpret_cast<const P*>(T.p[0] + i);
      const acc_t c0 = cs[0];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = c0 * static_cast<acc_t>(t.v[e]);
    }
    for (int j = 1; j < k; ++j) {
      const P t = *reinterpret_cast<const P*>(T.p[j] + i);
      const acc_t cj = cs[j];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += cj * static_cast<acc_t>(t.v[e]);
    }
    P o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<scalar_t>(acc[e]);
    *reinterpret_cast<P*>(out + i) = o;
  }
  // scalar tail (numel % VEC elements)
  for (int64_t i = nvec * VEC + tid; i < numel; i += stride) {
    const acc_t* cs = c + (cstride ? (i / len) * cstride : 0);
    acc_t acc = cs[0] * static_cast<acc_t>(T.p[0][i]);
    for (int j = 1; j < k; ++j) acc += cs[j] * static_cast<acc_t>(T.p[j][i]);
    out[i] = static_cast<scalar_t>(acc);
  }
}

enum class Mode { kResidualForward, kUpdateBackward, kResidualBackward };

struct ItemGrid {
  int64_t n, len, chunk, nb;
  int64_t total() const { return n * nb; }
};

ItemGrid make_items(const RkProblem& p) {
  ItemGrid it;
  it.n = p.n;
  it.len = p.len;
  it.chunk = std::max<int64_t>(1, std::min(p.len, kReduceBlock));
  it.nb = (p.len + it.chunk - 1) / it.chunk;
  // one thread block per item
  TORCH_CHECK(it.total() < (int64_t(1) << 31), "rk ops: too many samples for one launch (", it.total(),
              " reduction items); split the batch");
  return it;
}

// Threads per reduction block: a power of two, small for short items.
int reduce_threads(int64_t chunk) {
  int t = 32;
  while (t < kThreads && int64_t(t) * 4 < chunk) t *= 2;
  return t;
}

// Fixed-shape tree reduction of `P` values per thread over the block; result in sh[0..P).
template <typename acc_t>
__device__ void block_reduce(acc_t* sh, const acc_t* vals, int P) {
  const int tid = threadIdx.x;
  for (int j = 0; j < P; ++j) sh[j * blockDim.x + tid] = vals[j];
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (tid < off)
      for (int j = 0; j < P; ++j) sh[j * blockDim.x + tid] += sh[j * blockDim.x + tid + off];
    __syncthreads();
  }
}

// Stage 1: one block per item. Per element (r = sum_j c_j T_j - y where a target exists):
//   kResidualForward:  accumulate r^2                              (P = 1)
//   kUpdateBackward:   g = grad;       dT_j = c_j g; accumulate g T_j   (P = k)
//   kResidualBackward: g = scale_s r;  dT_j = c_j g; dy = -g; accumulate g T_j
template <typename scalar_t, typename acc_t, Mode MODE>
__global__ void reduce_stage1(TermPtrs<scalar_t> T, int k, const acc_t* __restrict__ c,
                              int64_t cstride, const scalar_t* __restrict__ y,
                              const scalar_t* __restrict__ grad, const acc_t* __restrict__ scale,
                              OutPtrs<scalar_t> gterms, bool need_terms, scalar_t* gtarget,
                              bool need_sums, ItemGrid it, acc_t* __restrict__ partial) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t item = blockIdx.x;
  const int64_t s = item / it.nb;
  const int64_t lo = s * it.len + (item - s * it.nb) * it.chunk;
  const int64_t hi = min(lo + it.chunk, (s + 1) * it.len);
  const acc_t* cs = c + s * cstride;
  const int P = (MODE == Mode::kResidualForward) ? 1 : k;
  acc_t sums[kMaxTerms];
  for (int j = 0; j < P; ++j) sums[j] = acc_t(0);
  acc_t f = acc_t(0);
  if (MODE == Mode::kResidualBackward) f = scale[s];

  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    acc_t g;
    if (MODE == Mode::kUpdateBackward) {
      g = static_cast<acc_t>(grad[i]);
    } else {
      acc_t r = -static_cast<acc_t>(y[i]);
      for (int j = 0; j < k; ++j) r += cs[j] * static_cast<acc_t>(T.p[j][i]);
      if (MODE == Mode::kResidualForward) {
        sums[0] += r * r;
        continue;
      }
      g = f * r;
      if (gtarget) gtarget[i] = static_cast<scalar_t>(-g);
    }
    for (int j = 0; j < k; ++j) {
      if (need_terms) gterms.p[j][i] = static_cast<scalar_t>(cs[j] * g);
      if (need_sums) sums[j] += g * static_cast<acc_t>(T.p[j][i]);
    }
  }
  if (!need_sums) return;
  block_reduce(sh, sums, P);
  if (threadIdx.x < P) partial[item * P + threadIdx.x] = sh[threadIdx.x * blockDim.x];
}

// Stage 2: one block per output (row, j); adds partial[item, j] over the row's items
// [row * per_row, (row + 1) * per_row) in a fixed order, then finishes:
//   rms:    out = sqrt(sum / len)       coefficient gradient: out = sum
template <typename acc_t, typename out_t, bool RMS>
__global__ void reduce_stage2(const acc_t* __restrict__ partial, int P, int64_t per_row,
                              double len, out_t* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t o = blockIdx.x;
  const int64_t row = o / P;
  const int j = static_cast<int>(o - row * P);
  acc_t acc = acc_t(0);
  for (int64_t b = threadIdx.x; b < per_row; b += blockDim.x) acc += partial[(row * per_row + b) * P + j];
  block_reduce(sh, &acc, 1);
  if (threadIdx.x == 0) {
    const acc_t v = sh[0];
    out[o] = RMS ? static_cast<out_t>(sqrt(static_cast<double>(v) / len)) : static_cast<out_t>(v);
  }
}

template <typename acc_t, typename out_t, bool RMS>
void launch_stage2(const at::Tensor& partial, int P, int64_t rows, int64_t per_row, int64_t len,
                   out_t* out, cudaStream_t stream) {
  if (rows * P == 0) return;
  const int threads = kThreads;
  reduce_stage2<acc_t, out_t, RMS><<<rows * P, threads, threads * sizeof(acc_t), stream>>>(
      partial.data_ptr<acc_t>(), P, per_row, static_cast<double>(len), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Coefficient gradients from stage-1 partials [items, k]: per sample [N, k] or shared [k].
template <typename acc_t>
at::Tensor finish_coeff_grad(const at::Tensor& partial, const ItemGrid& it, const RkProblem& p,
                             const at::Tensor& coeffs, cudaStream_t stream) {
  const int64_t rows = p.per_sample ? p.n : 1;
  const int64_t per_row = p.per_sample ? it.nb : it.total();
  at::Tensor out = p.per_sample ? at::empty({p.n, p.k}, coeffs.options()) : at::empty({p.k}, coeffs.options());
  if (it.total() == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(coeffs.scalar_type(), "rk_coeff_grad", [&] {
    launch_stage2<acc_t, scalar_t, false>(partial, static_cast<int>(p.k), rows, per_row, p.len,
                                          out.data_ptr<scalar_t>(), stream);
  });
  return out;
}

}  // namespace

void rk_update_out(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& out) {
  const char* op = "rk_update_out";
  const RkProblem p = check_rk_args(op, terms, coeffs);
  check_like_terms(op, "out", out, terms[0]);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(terms[0].device());
  const auto ts = contiguous_terms(terms);
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const bool direct = out.is_contiguous();
  at::Tensor dst = direct ? out : at::empty(out.sizes(), out.options());
  const int64_t numel = dst.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_update_out", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const auto T = term_ptrs<scalar_t>(ts);
    bool vec_ok = aligned16(dst.data_ptr()) && (!p.per_sample || p.len % VEC == 0);
    for (const auto& t : ts) vec_ok = vec_ok && aligned16(t.data_ptr());
    const int64_t work = vec_ok ? numel / VEC + numel % VEC : numel;
    const int64_t blocks = std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, kMaxBlocks));
    const int64_t cstride = p.per_sample ? p.k : 0;
    if (vec_ok) {
      update_kernel<scalar_t, acc_t, VEC><<<blocks, kThreads, 0, stream>>>(
          T, static_cast<int>(p.k), c.data_ptr<acc_t>(), cstride, p.len, numel, dst.data_ptr<scalar_t>());
    } else {
      update_kernel<scalar_t, acc_t, 1><<<blocks, kThreads, 0, stream>>>(
          T, static_cast<int>(p.k), c.data_ptr<acc_t>(), cstride, p.len, numel, dst.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const c10::cuda::CUDAGuard guard(terms[0].device());
  const auto ts = contiguous_terms(terms);
  const at::Tensor tg = target.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const ItemGrid it = make_items(p);
  at::Tensor rms = at::empty({p.n}, terms[0].options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({it.total()}, terms[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (it.total() > 0) {
      const int threads = reduce_threads(it.chunk);
      reduce_stage1<scalar_t, acc_t, Mode::kResidualForward><<<it.total(), threads, threads * sizeof(acc_t), stream>>>(
          term_ptrs<scalar_t>(ts), static_cast<int>(p.k), c.data_ptr<acc_t>(), p.per_sample ? p.k : 0,
          tg.data_ptr<scalar_t>(), nullptr, nullptr, OutPtrs<scalar_t>{}, false, nullptr, true, it,
          partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // mean over zero elements is NaN, as in torch's mean()
    launch_stage2<acc_t, scalar_t, true>(partial, 1, p.n, it.nb, p.len, rms.data_ptr<scalar_t>(), stream);
  });
  return rms;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> rk_update_backward(
    const at::Tensor& grad, at::TensorList terms, const at::Tensor& coeffs, bool need_terms,
    bool need_coeffs) {
  const char* op = "rk_update_backward";
  const RkProblem p = check_rk_args(op, terms, coeffs);
  check_like_terms(op, "grad", grad, terms[0]);
  const c10::cuda::CUDAGuard guard(terms[0].device());
  const auto ts = contiguous_terms(terms);
  const at::Tensor g = grad.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const ItemGrid it = make_items(p);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> gterms;
  if (need_terms)
    for (int64_t j = 0; j < p.k; ++j) gterms.push_back(at::empty(terms[0].sizes(), terms[0].options()));
  at::Tensor gcoeffs = at::empty({0}, coeffs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_update_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({need_coeffs ? it.total() * p.k : 0},
                                   terms[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    OutPtrs<scalar_t> go{};
    for (size_t j = 0; j < gterms.size(); ++j) go.p[j] = gterms[j].data_ptr<scalar_t>();
    if (it.total() > 0 && (need_terms || need_coeffs)) {
      const int threads = reduce_threads(it.chunk);
      reduce_stage1<scalar_t, acc_t, Mode::kUpdateBackward><<<it.total(), threads, threads * p.k * sizeof(acc_t), stream>>>(
          term_ptrs<scalar_t>(ts), static_cast<int>(p.k), c.data_ptr<acc_t>(), p.per_sample ? p.k : 0, nullptr,
          g.data_ptr<scalar_t>(), nullptr, go, need_terms, nullptr, need_coeffs, it,
          need_coeffs ? partial.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_coeffs) gcoeffs = finish_coeff_grad<acc_t>(partial, it, p, coeffs, stream);
  });
  return {gterms, gcoeffs};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> rk_residual_backward(
    const at::Tensor& grad, const at::Tensor& rms, at::TensorList terms, const at::Tensor& coeffs,
    const at::Tensor& target, bool need_terms, bool need_coeffs, bool need_target) {
  const char* op = "rk_residual_backward";
  const RkProblem p = check_rk_args(op, terms, coeffs, /*need_leading_dim=*/true);
  check_like_terms(op, "target", target, terms[0]);
  check_per_sample(op, "grad", grad, p, terms[0]);
  check_per_sample(op, "rms", rms, p, terms[0]);
  const c10::cuda::CUDAGuard guard(terms[0].device());
  const auto ts = contiguous_terms(terms);
  const at::Tensor tg = target.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const at::ScalarType acc = acc_dtype(p.dtype);
  // d rms / d r_i = r_i / (len rms): per-sample factor grad / (len rms), 0 where rms = 0
  const at::Tensor rms_acc = rms.to(acc);
  const at::Tensor scale = at::where(rms_acc > 0, grad.to(acc) / (rms_acc * static_cast<double>(p.len)),
                                     at::zeros_like(rms_acc))
                               .contiguous();
  const ItemGrid it = make_items(p);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> gterms;
  if (need_terms)
    for (int64_t j = 0; j < p.k; ++j) gterms.push_back(at::empty(terms[0].sizes(), terms[0].options()));
  at::Tensor gtarget = need_target ? at::empty(terms[0].sizes(), terms[0].options())
                                   : at::empty({0}, terms[0].options());
  at::Tensor gcoeffs = at::empty({0}, coeffs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({need_coeffs ? it.total() * p.k : 0},
                                   terms[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    OutPtrs<scalar_t> go{};
    for (size_t j = 0; j < gterms.size(); ++j) go.p[j] = gterms[j].data_ptr<scalar_t>();
    if (it.total() > 0 && (need_terms || need_coeffs || need_target)) {
      const int threads = reduce_threads(it.chunk);
      reduce_stage1<scalar_t, acc_t, Mode::kResidualBackward><<<it.total(), threads, threads * p.k * sizeof(acc_t), stream>>>(
          term_ptrs<scalar_t>(ts), static_cast<int>(p.k), c.data_ptr<acc_t>(), p.per_sample ? p.k : 0,
          tg.data_ptr<scalar_t>(), nullptr, scale.data_ptr<acc_t>(), go, need_terms,
          need_target ? gtarget.data_ptr<scalar_t>() : nullptr, need_coeffs, it,
          need_coeffs ? partial.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_coeffs) gcoeffs = finish_coeff_grad<acc_t>(partial, it, p, coeffs, stream);
  });
  return {gterms, gcoeffs, gtarget};
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(bespoke_ext, CUDA, m) {
  m.impl("rk_update", &cuda::rk_update);
  m.impl("rk_update_out", &cuda::rk_update_out);
  m.impl("rk_residual", &cuda::rk_residual);
  m.impl("rk_update_backward", &cuda::rk_update_backward);
  m.impl("rk_residual_backward", &cuda::rk_residual_backward);
}

}  // namespace bespoke_ext
