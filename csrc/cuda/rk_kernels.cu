// CUDA kernels of the scaled Runge-Kutta ops (twins of cpu/rk_kernels.cpp, same names).
//
// - Every kernel takes its pointers in one `__grid_constant__` parameter struct: term j is
//   read from parameter space with a run-time j, so no thread copies the pointer arrays
//   into local memory (no stack frames), whatever the number of terms.
// - Elementwise passes (the update, the residual gradient): 16-byte vector loads and stores
//   with a scalar tail, 64-bit indices, grid-stride loops over a clamped grid.
// - Reductions (residual RMS, coefficient gradients), two stages without atomics or host
//   synchronisation, so the same bits every run and capturable in a CUDA graph:
//   stage 1 reduces each item (a sample of at most kThreadSample elements per thread, else a
//   chunk of at most kWarpChunk elements per warp, with a fixed shuffle tree) into one partial
//   per item and sum; stage 2 adds each output's partials in a fixed order (one thread per
//   output for a few partials, one block with a fixed tree for many). Coefficient gradients
//   are computed kGroup terms at a time (grid dimension y), so the per-thread sums stay in
//   registers for any number of terms.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "../rk_common.h"
#include "../rk_ops.h"

namespace bespoke_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;                     // elementwise and stage-2 blocks
constexpr int kReduceThreads = 128;               // stage-1 blocks: 4 warps, many blocks
constexpr int kWarp = 32;
constexpr int64_t kWarpChunk = 1024;              // elements per warp item
constexpr int64_t kThreadSample = 32;             // samples up to this length: one thread each
constexpr int kGroup = 4;                         // coefficient sums per thread and pass
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

// Everything one launch reads or writes; unused pointers stay null. 2 x kMaxTerms pointers
// (2 KiB at 128 terms) fit the 4 KiB kernel parameter limit.
template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* term[kMaxTerms];
  scalar_t* gterm[kMaxTerms];  // gradients of the terms (null: not asked for)
  int k;
  const acc_t* c;              // coefficients in the math type
  int64_t cstride;             // k for per-sample [N, k] coefficients, 0 for shared [k]
  int64_t len, numel;          // elements per sample, in all
  scalar_t* out;               // rk_update
  const scalar_t* y;           // residual target
  const scalar_t* grad;        // incoming gradient of rk_update ...
  const acc_t* gacc;           // ... or the residual gradient, in the math type
  const acc_t* scale;          // [N] factor of the residual gradient
  acc_t* gacc_out;             // residual gradient written by residual_grad_kernel
  scalar_t* gy;                // gradient of the target
};

template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const RkProblem& p, const std::vector<at::Tensor>& ts,
                                    const at::Tensor& c) {
  Params<scalar_t, acc_t> q{};
  q.k = static_cast<int>(p.k);
  for (int64_t j = 0; j < p.k; ++j) q.term[j] = ts[j].data_ptr<scalar_t>();
  q.c = c.data_ptr<acc_t>();
  q.cstride = p.per_sample ? p.k : 0;
  q.len = std::max<int64_t>(p.len, 1);
  q.numel = p.n * p.len;
  return q;
}

template <typename scalar_t, int W>
struct alignas(sizeof(scalar_t) * W) Pack {
  scalar_t v[W];
};

template <int W, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, W> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, W>*>(p);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t grid_for(int64_t work, int threads) {
  return std::max<int64_t>(1, std::min((work + threads - 1) / threads, kMaxBlocks));
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes, W consecutive elements of one sample per step (W = 1: the scalar tail).
//   RESID = false:  out = sum_j c[s, j] T_j
//   RESID = true:   g = scale[s] (sum_j c[s, j] T_j - y);  gacc_out = g;  gy = -g
template <typename scalar_t, typename acc_t, bool RESID, int W>
__device__ __forceinline__ void combine_at(const Params<scalar_t, acc_t>& p, int64_t i) {
  const int64_t s = (p.cstride != 0 || RESID) ? i / p.len : 0;
  const acc_t* cs = p.c + s * p.cstride;
  // c_0 T_0 + c_1 T_1 + ... left to right from the first product, as the CPU loops (k >= 1 is checked):
  // with no fused multiply-add (setup.py: --fmad=false) the same bits, -0.0 included
  acc_t acc[W];
  {
    const Pack<scalar_t, W> t = load_pack<W>(p.term[0] + i);
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = cs[0] * static_cast<acc_t>(t.v[e]);
  }
  for (int j = 1; j < p.k; ++j) {
    const Pack<scalar_t, W> t = load_pack<W>(p.term[j] + i);
    const acc_t cj = cs[j];
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] += cj * static_cast<acc_t>(t.v[e]);
  }
  if constexpr (RESID) {
    const Pack<scalar_t, W> y = load_pack<W>(p.y + i);
    const acc_t f = p.scale[s];
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = f * (acc[e] - static_cast<acc_t>(y.v[e]));
    if (p.gacc_out != nullptr)
#pragma unroll
      for (int e = 0; e < W; ++e) p.gacc_out[i + e] = acc[e];
    if (p.gy != nullptr) {
      Pack<scalar_t, W> o;
#pragma unroll
      for (int e = 0; e < W; ++e) o.v[e] = static_cast<scalar_t>(-acc[e]);
      *reinterpret_cast<Pack<scalar_t, W>*>(p.gy + i) = o;
    }
  } else {
    Pack<scalar_t, W> o;
#pragma unroll
    for (int e = 0; e < W; ++e) o.v[e] = static_cast<scalar_t>(acc[e]);
    // out may be a term itself: this thread has read those elements above
    *reinterpret_cast<Pack<scalar_t, W>*>(p.out + i) = o;
  }
}

// With per-sample values (coefficients or the residual factor) the vector path needs
// len % VEC == 0 so that a vector never straddles two samples.
template <typename scalar_t, typename acc_t, bool RESID, int VEC>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const __grid_constant__ Params<scalar_t, acc_t> p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = p.numel / VEC;
  for (int64_t v = tid; v < nvec; v += stride) combine_at<scalar_t, acc_t, RESID, VEC>(p, v * VEC);
  for (int64_t i = nvec * VEC + tid; i < p.numel; i += stride) combine_at<scalar_t, acc_t, RESID, 1>(p, i);
}

template <typename scalar_t, typename acc_t, bool RESID>
void launch_combine(const Params<scalar_t, acc_t>& q, bool per_sample_values, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  bool vec_ok = !per_sample_values || q.len % VEC == 0;
  for (int j = 0; j < q.k; ++j) vec_ok = vec_ok && aligned16(q.term[j]);
  vec_ok = vec_ok && aligned16(RESID ? static_cast<const void*>(q.y) : q.out);
  if (RESID && q.gy != nullptr) vec_ok = vec_ok && aligned16(q.gy);
  const int64_t work = vec_ok ? q.numel / VEC + q.numel % VEC : q.numel;
  const int64_t blocks = grid_for(work, kThreads);
  if (vec_ok) {
    combine_kernel<scalar_t, acc_t, RESID, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(q);
  } else {
    combine_kernel<scalar_t, acc_t, RESID, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(q);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Reduction items, fixed by the shape. Per-sample sums: samples of len <= kThreadSample are
// one thread's item each; longer samples are cut into chunks of kWarpChunk, one warp each.
// Shared-coefficient sums: flat chunks of kWarpChunk, one warp each. One partial per item.
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

struct Items {
  bool flat, per_thread;
  int64_t n, len, numel, nb, count;  // nb: items per sample (per-sample items)

  __device__ void range(int64_t item, int64_t& lo, int64_t& hi) const {
    if (flat) {
      lo = item * kWarpChunk;
      hi = imin(numel, lo + kWarpChunk);
    } else {
      const int64_t s = item / nb;
      lo = s * len + (item - s * nb) * kWarpChunk;
      hi = imin((s + 1) * len, lo + kWarpChunk);
    }
  }
};

Items make_items(const RkProblem& p, bool flat) {
  Items it{};
  it.flat = flat;
  it.n = p.n;
  it.len = std::max<int64_t>(p.len, 1);
  it.numel = p.n * p.len;
  it.per_thread = !flat && it.len <= kThreadSample;
  it.nb = (flat || it.per_thread) ? 1 : (it.len + kWarpChunk - 1) / kWarpChunk;
  if (it.numel == 0) it.count = 0;
  else if (flat) it.count = (it.numel + kWarpChunk - 1) / kWarpChunk;
  else it.count = it.n * it.nb;
  return it;
}

enum class Mode { kResidual, kGradDot, kAccGradDot };

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // complete in lane 0
}

// One element of stage 1: with r = sum_j c_j T_j - y (kResidual) accumulate r^2; else, with
// g the incoming gradient, write dT_j = c_j g and accumulate g T_j for the group's terms
// j = j0 .. j0 + kGroup - 1 (those below k).
template <typename scalar_t, typename acc_t, Mode MODE>
__device__ __forceinline__ void reduce_element(const Params<scalar_t, acc_t>& p, const acc_t* cs,
                                               int j0, bool need_sums, int64_t i, acc_t* sums) {
  if constexpr (MODE == Mode::kResidual) {
    // (sum_j c_j T_j) - y, in the forward combination's order: a target equal to rk_update's output
    // (a perfect fit) gives exactly 0, as on the CPU and in the residual backward (combine_at)
    acc_t x = cs[0] * static_cast<acc_t>(p.term[0][i]);
    for (int j = 1; j < p.k; ++j) x += cs[j] * static_cast<acc_t>(p.term[j][i]);
    const acc_t r = x - static_cast<acc_t>(p.y[i]);
    sums[0] += r * r;
  } else {
    const acc_t g = MODE == Mode::kGradDot ? static_cast<acc_t>(p.grad[i]) : p.gacc[i];
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      const int j = j0 + q;
      if (j < p.k) {
        if (p.gterm[0] != nullptr) p.gterm[j][i] = static_cast<scalar_t>(cs[j] * g);
        if (need_sums) sums[q] += g * static_cast<acc_t>(p.term[j][i]);
      }
    }
  }
}

// Stage 1. partial[item, j] for j < P (P = 1 for the residual, k for coefficient sums);
// blockIdx.y picks the group of terms.
template <typename scalar_t, typename acc_t, Mode MODE, bool PER_THREAD>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_stage1(const __grid_constant__ Params<scalar_t, acc_t> p, Items it, acc_t* partial) {
  constexpr int S = MODE == Mode::kResidual ? 1 : kGroup;
  const int P = MODE == Mode::kResidual ? 1 : p.k;
  const int j0 = static_cast<int>(blockIdx.y) * kGroup;
  const bool need_sums = partial != nullptr;
  if constexpr (PER_THREAD) {
    // one sample per thread, its elements in order
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < it.n; s += stride) {
      const acc_t* cs = p.c + s * p.cstride;
      acc_t sums[S] = {};
      for (int64_t i = s * it.len; i < (s + 1) * it.len; ++i)
        reduce_element<scalar_t, acc_t, MODE>(p, cs, j0, need_sums, i, sums);
      if (need_sums)
#pragma unroll
        for (int q = 0; q < S; ++q)
          if (j0 + q < P) partial[s * P + j0 + q] = sums[q];
    }
  } else {
    // one item per warp; the loop bounds are the same for all lanes of a warp
    const int lane = threadIdx.x % kWarp;
    const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
    for (int64_t item = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; item < it.count;
         item += warps) {
      int64_t lo, hi;
      it.range(item, lo, hi);
      const acc_t* cs = p.c + (lo / it.len) * p.cstride;
      acc_t sums[S] = {};
      for (int64_t i = lo + lane; i < hi; i += kWarp)
        reduce_element<scalar_t, acc_t, MODE>(p, cs, j0, need_sums, i, sums);
      if (need_sums) {
#pragma unroll
        for (int q = 0; q < S; ++q) sums[q] = warp_sum(sums[q]);
        if (lane == 0)
#pragma unroll
          for (int q = 0; q < S; ++q)
            if (j0 + q < P) partial[item * P + j0 + q] = sums[q];
      }
    }
  }
}

// Stage 2: out[row * P + j] = finish(sum_b partial[(row * per_row + b) * P + j]), added in
// double in a fixed order; finish is sqrt(sum / len) for the RMS (the mean in double, the root in the
// math type, as the CPU's rms_from_sums), the sum itself otherwise.
template <typename acc_t, typename out_t, bool RMS>
__device__ __forceinline__ void finish_output(out_t* out, int64_t o, double v, double len) {
  out[o] = RMS ? static_cast<out_t>(sqrt(static_cast<acc_t>(v / len))) : static_cast<out_t>(v);
}

template <typename acc_t, typename out_t, bool RMS>
__global__ void __launch_bounds__(kThreads)
    stage2_per_thread(const acc_t* __restrict__ partial, int P, int64_t outputs, int64_t per_row,
                      double len, out_t* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < outputs; o += stride) {
    const int64_t row = o / P, j = o - row * P;
    double v = 0;
    for (int64_t b = 0; b < per_row; ++b) v += static_cast<double>(partial[(row * per_row + b) * P + j]);
    finish_output<acc_t, out_t, RMS>(out, o, v, len);
  }
}

template <typename acc_t, typename out_t, bool RMS>
__global__ void __launch_bounds__(kThreads)
    stage2_per_block(const acc_t* __restrict__ partial, int P, int64_t outputs, int64_t per_row,
                     double len, out_t* __restrict__ out) {
  __shared__ double sh[kThreads];
  for (int64_t o = blockIdx.x; o < outputs; o += gridDim.x) {
    const int64_t row = o / P, j = o - row * P;
    double v = 0;
    for (int64_t b = threadIdx.x; b < per_row; b += blockDim.x)
      v += static_cast<double>(partial[(row * per_row + b) * P + j]);
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int off = blockDim.x / 2; off > 0; off >>= 1) {
      if (threadIdx.x < off) sh[threadIdx.x] += sh[threadIdx.x + off];
      __syncthreads();
    }
    if (threadIdx.x == 0) finish_output<acc_t, out_t, RMS>(out, o, sh[0], len);
    __syncthreads();  // sh is reused by the next output
  }
}

template <typename acc_t, typename out_t, bool RMS>
void launch_stage2(const at::Tensor& partial, int P, int64_t rows, int64_t per_row, int64_t len,
                   out_t* out, cudaStream_t stream) {
  const int64_t outputs = rows * P;
  if (outputs == 0) return;
  const acc_t* part = partial.data_ptr<acc_t>();
  if (per_row <= 64) {
    stage2_per_thread<acc_t, out_t, RMS><<<static_cast<unsigned>(grid_for(outputs, kThreads)), kThreads, 0, stream>>>(
        part, P, outputs, per_row, static_cast<double>(len), out);
  } else {
    stage2_per_block<acc_t, out_t, RMS><<<static_cast<unsigned>(std::min(outputs, kMaxBlocks)), kThreads, 0, stream>>>(
        part, P, outputs, per_row, static_cast<double>(len), out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, Mode MODE>
void launch_stage1(const Params<scalar_t, acc_t>& q, const Items& it, acc_t* partial, cudaStream_t stream) {
  if (it.count == 0) return;
  const int groups = MODE == Mode::kResidual ? 1 : (q.k + kGroup - 1) / kGroup;
  if (it.per_thread) {
    const dim3 grid(static_cast<unsigned>(grid_for(it.n, kReduceThreads)), groups);
    reduce_stage1<scalar_t, acc_t, MODE, true><<<grid, kReduceThreads, 0, stream>>>(q, it, partial);
  } else {
    const dim3 grid(static_cast<unsigned>(grid_for(it.count * kWarp, kReduceThreads)), groups);
    reduce_stage1<scalar_t, acc_t, MODE, false><<<grid, kReduceThreads, 0, stream>>>(q, it, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Gradients of rk_update given the gradient of its output (q.grad or q.gacc): dT_j into
// q.gterm (when set) and the coefficient gradient [N, k] or [k] (when need_coeffs).
template <typename scalar_t, typename acc_t, Mode MODE>
at::Tensor update_backward(const Params<scalar_t, acc_t>& q, const RkProblem& p, const at::Tensor& coeffs,
                           bool need_coeffs, cudaStream_t stream) {
  const Items it = make_items(p, /*flat=*/!p.per_sample);
  at::Tensor partial;
  if (need_coeffs)
    partial = at::empty({it.count * p.k}, coeffs.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (q.gterm[0] != nullptr || need_coeffs)
    launch_stage1<scalar_t, acc_t, MODE>(q, it, need_coeffs ? partial.data_ptr<acc_t>() : nullptr, stream);
  if (!need_coeffs) return at::empty({0}, coeffs.options());
  at::Tensor gcoeffs = p.per_sample ? at::empty({p.n, p.k}, coeffs.options()) : at::empty({p.k}, coeffs.options());
  if (it.count == 0) return gcoeffs.zero_();
  const int64_t rows = p.per_sample ? p.n : 1;
  const int64_t per_row = p.per_sample ? it.nb : it.count;
  // coefficients are float32 or float64 (check_rk_args)
  if (coeffs.scalar_type() == at::kDouble) {
    launch_stage2<acc_t, double, false>(partial, static_cast<int>(p.k), rows, per_row, p.len,
                                        gcoeffs.data_ptr<double>(), stream);
  } else {
    launch_stage2<acc_t, float, false>(partial, static_cast<int>(p.k), rows, per_row, p.len,
                                       gcoeffs.data_ptr<float>(), stream);
  }
  return gcoeffs;
}

// The device of the launches: the terms' GPU (the checks name any other device mismatch).
std::optional<at::Device> terms_device(at::TensorList terms) {
  if (!terms.empty() && terms[0].defined() && terms[0].is_cuda()) return terms[0].device();
  return std::nullopt;
}

void update_into(const RkProblem& p, const std::vector<at::Tensor>& ts, const at::Tensor& c,
                 const at::Tensor& dst) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto q = make_params<scalar_t, acc_t>(p, ts, c);
    q.out = dst.data_ptr<scalar_t>();
    launch_combine<scalar_t, acc_t, false>(q, p.per_sample, stream);
  });
}

}  // namespace

void rk_update_out(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& out) {
  const c10::cuda::OptionalCUDAGuard guard(terms_device(terms));
  update_out(terms, coeffs, out, update_into);
}

at::Tensor rk_update(at::TensorList terms, const at::Tensor& coeffs) {
  const c10::cuda::OptionalCUDAGuard guard(terms_device(terms));
  return update(terms, coeffs, update_into);
}

at::Tensor rk_residual(at::TensorList terms, const at::Tensor& coeffs, const at::Tensor& target) {
  const char* op = "rk_residual";
  const c10::cuda::OptionalCUDAGuard guard(terms_device(terms));
  const RkProblem p = check_rk_args(op, terms, coeffs, /*need_leading_dim=*/true);
  check_like_terms(op, "target", target, terms[0]);
  const auto ts = contiguous_terms(terms);
  const at::Tensor tg = target.contiguous();
  const at::Tensor c = coeffs_for_math(coeffs, p);
  const Items it = make_items(p, /*flat=*/false);
  at::Tensor rms = at::empty({p.n}, terms[0].options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto q = make_params<scalar_t, acc_t>(p, ts, c);
    q.y = tg.data_ptr<scalar_t>();
    at::Tensor partial = at::empty({it.count}, terms[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    launch_stage1<scalar_t, acc_t, Mode::kResidual>(q, it, partial.data_ptr<acc_t>(), stream);
    // the mean over zero elements is NaN, as in torch's mean()
    if (it.count == 0) rms.fill_(std::numeric_limits<double>::quiet_NaN());
    else launch_stage2<acc_t, scalar_t, true>(partial, 1, p.n, it.nb, p.len, rms.data_ptr<scalar_t>(), stream);
  });
  return rms;
}

// Formulas and checks: prepare_update_backward (rk_common.h).
std::tuple<std::vector<at::Tensor>, at::Tensor> rk_update_backward(
    const at::Tensor& grad, at::TensorList terms, const at::Tensor& coeffs, bool need_terms,
    bool need_coeffs) {
  const c10::cuda::OptionalCUDAGuard guard(terms_device(terms));
  UpdateBackward b = prepare_update_backward(grad, terms, coeffs, need_terms);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gcoeffs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.p.dtype, "rk_update_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto q = make_params<scalar_t, acc_t>(b.p, b.terms, b.coeffs);
    q.grad = b.grad.data_ptr<scalar_t>();
    for (size_t j = 0; j < b.gterms.size(); ++j) q.gterm[j] = b.gterms[j].data_ptr<scalar_t>();
    gcoeffs = update_backward<scalar_t, acc_t, Mode::kGradDot>(q, b.p, coeffs, need_coeffs, stream);
  });
  return {b.gterms, gcoeffs};
}

// Formulas and checks: prepare_residual_backward (rk_common.h). One elementwise pass forms
// the residual gradient g_r (and d target = -g_r); the update's backward takes it from there.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> rk_residual_backward(
    const at::Tensor& grad, const at::Tensor& rms, at::TensorList terms, const at::Tensor& coeffs,
    const at::Tensor& target, bool need_terms, bool need_coeffs, bool need_target) {
  const c10::cuda::OptionalCUDAGuard guard(terms_device(terms));
  ResidualBackward b = prepare_residual_backward(grad, rms, terms, coeffs, target, need_terms, need_target);
  const RkProblem& p = b.p;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gcoeffs = at::empty({0}, coeffs.options());
  if (p.n * p.len == 0) {
    if (need_coeffs) gcoeffs = at::zeros(coeffs.sizes(), coeffs.options());
    return {b.gterms, gcoeffs, b.gtarget};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "rk_residual_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto q = make_params<scalar_t, acc_t>(p, b.terms, b.coeffs);
    const bool need_g = need_terms || need_coeffs;
    at::Tensor g_r = need_g ? at::empty(b.target.sizes(), b.target.options().dtype(c10::CppTypeToScalarType<acc_t>::value))
                            : at::Tensor();
    if (need_g || need_target) {
      q.y = b.target.data_ptr<scalar_t>();
      q.scale = b.scale.data_ptr<acc_t>();
      q.gacc_out = need_g ? g_r.data_ptr<acc_t>() : nullptr;
      q.gy = need_target ? b.gtarget.data_ptr<scalar_t>() : nullptr;
      launch_combine<scalar_t, acc_t, true>(q, /*per_sample_values=*/true, stream);
    }
    if (need_g) {
      q.gacc = g_r.data_ptr<acc_t>();
      for (size_t j = 0; j < b.gterms.size(); ++j) q.gterm[j] = b.gterms[j].data_ptr<scalar_t>();
      gcoeffs = update_backward<scalar_t, acc_t, Mode::kAccGradDot>(q, p, coeffs, need_coeffs, stream);
    }
  });
  return {b.gterms, gcoeffs, b.gtarget};
}

}  // namespace cuda

BX_REGISTER_RK_OPS(CUDA, cuda)

}  // namespace bespoke_ext
