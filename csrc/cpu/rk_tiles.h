// Inner loops of the CPU kernels, over one contiguous range of flat element indices.
//
// rk_kernels.cpp includes this file twice, inside two namespaces: once for the build's
// baseline instruction set and once with AVX2 enabled, and picks one when it runs (see
// BX_CPU_ISA there). The built library stays portable (no -march flags) and both versions give
// the same bits: no FMA contraction (-ffp-contract=off, no FMA target), the same operations
// in the same order, only wider registers.
//
// Every loop runs over a tile of at most kTile elements combined in a local math-type
// buffer: loops that touch one input and a local buffer have no aliasing, so the compiler
// vectorises them. A range may cross sample boundaries; per-sample values (coefficient row,
// residual factor, per-sample sums) are looked up per run of one sample inside the tile.
//
// No include guard and no includes: this file is a body, included once per instruction set.

// Calls f(s, o, r) for each run of one sample inside the tile [a, a + m): elements
// a + o .. a + o + r - 1 all belong to sample s.
template <typename F>
inline void for_runs(int64_t len, int64_t a, int64_t m, const F& f) {
  int64_t s = a / len;
  for (int64_t o = 0; o < m; ++s) {
    const int64_t r = std::min(len - (a + o - s * len), m - o);
    f(s, o, r);
    o += r;
  }
}

// x[0:r) = sum_{j < K} c[j] t_j[off : off + r)   (FIRST)   or   x[0:r) += the same:
// up to four terms per pass over the local buffer, summed left to right.
template <int K, bool FIRST, typename acc_t, typename scalar_t>
inline void combine_group(acc_t* x, const acc_t* c, const scalar_t* const* t, int64_t off, int64_t r) {
  acc_t cj[K];
  const scalar_t* tj[K];
  for (int j = 0; j < K; ++j) {
    cj[j] = c[j];
    tj[j] = t[j] + off;
  }
  for (int64_t i = 0; i < r; ++i) {
    acc_t v = FIRST ? cj[0] * static_cast<acc_t>(tj[0][i]) : x[i] + cj[0] * static_cast<acc_t>(tj[0][i]);
    for (int j = 1; j < K; ++j) v += cj[j] * static_cast<acc_t>(tj[j][i]);
    x[i] = v;
  }
}

// x[0:r) = sum_j c[j] T_j[off : off + r) for one coefficient row c
template <typename acc_t, typename scalar_t>
inline void combine_row(acc_t* x, const acc_t* c, const scalar_t* const* t, int64_t k, int64_t off,
                        int64_t r) {
  for (int64_t j = 0; j < k; j += 4) {
    const bool first = j == 0;
    switch (std::min<int64_t>(4, k - j)) {
      case 1: first ? combine_group<1, true>(x, c + j, t + j, off, r) : combine_group<1, false>(x, c + j, t + j, off, r); break;
      case 2: first ? combine_group<2, true>(x, c + j, t + j, off, r) : combine_group<2, false>(x, c + j, t + j, off, r); break;
      case 3: first ? combine_group<3, true>(x, c + j, t + j, off, r) : combine_group<3, false>(x, c + j, t + j, off, r); break;
      default: first ? combine_group<4, true>(x, c + j, t + j, off, r) : combine_group<4, false>(x, c + j, t + j, off, r); break;
    }
  }
}

// x[0:m) = sum_j c[s(i), j] T_j[a + i]: the combination every op starts from.
template <typename scalar_t, typename acc_t>
inline void combine(const Args<scalar_t, acc_t>& p, int64_t a, int64_t m, acc_t* x) {
  if (!p.per_sample) {
    combine_row(x, p.c, p.term, p.k, a, m);
  } else if (p.len == 1) {
    // one element per sample: coefficient j of element i is c[(a + i) k + j], a strided load
    const acc_t* c = p.c + a * p.k;
    const int64_t k = p.k;
    for (int64_t i = 0; i < m; ++i) x[i] = c[i * k] * static_cast<acc_t>(p.term[0][a + i]);
    for (int64_t j = 1; j < k; ++j)
      for (int64_t i = 0; i < m; ++i) x[i] += c[i * k + j] * static_cast<acc_t>(p.term[j][a + i]);
  } else {
    for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
      combine_row(x + o, p.c + s * p.k, p.term, p.k, a + o, r);
    });
  }
}

template <typename acc_t, typename scalar_t>
inline void store(scalar_t* dst, const acc_t* x, int64_t m) {
  for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<scalar_t>(x[i]);
}

// sum_i x[i] y[i] in a fixed order that depends only on r: 8 interleaved lanes (a vector
// register of floats) for long runs, one for short ones; lanes are added in double.
template <typename acc_t, typename scalar_t>
inline double dot(const acc_t* x, const scalar_t* y, int64_t r) {
  constexpr int64_t L = 8;
  if (r < 4 * L) {
    acc_t s = 0;
    for (int64_t i = 0; i < r; ++i) s += x[i] * static_cast<acc_t>(y[i]);
    return static_cast<double>(s);
  }
  acc_t lanes[L] = {};
  int64_t i = 0;
  for (; i + L <= r; i += L)
    for (int64_t l = 0; l < L; ++l) lanes[l] += x[i + l] * static_cast<acc_t>(y[i + l]);
  for (int64_t l = 0; i < r; ++i, ++l) lanes[l] += x[i] * static_cast<acc_t>(y[i]);
  double s = 0;
  for (int64_t l = 0; l < L; ++l) s += static_cast<double>(lanes[l]);
  return s;
}

// out[lo:hi) = sum_j c_j T_j
template <typename scalar_t, typename acc_t>
void update_range(const Args<scalar_t, acc_t>& p, int64_t lo, int64_t hi) {
  acc_t x[kTile];
  for (int64_t a = lo; a < hi; a += kTile) {
    const int64_t m = std::min(kTile, hi - a);
    combine(p, a, m, x);
    store(p.out + a, x, m);
  }
}

// sums[s - lo / len] += sum over the range's elements of sample s of (sum_j c_j T_j - y)^2
template <typename scalar_t, typename acc_t>
void residual_range(const Args<scalar_t, acc_t>& p, int64_t lo, int64_t hi, double* sums) {
  acc_t x[kTile];
  const int64_t s0 = lo / p.len;
  for (int64_t a = lo; a < hi; a += kTile) {
    const int64_t m = std::min(kTile, hi - a);
    combine(p, a, m, x);
    for (int64_t i = 0; i < m; ++i) x[i] -= static_cast<acc_t>(p.y[a + i]);
    for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) { sums[s - s0] += dot(x + o, x + o, r); });
  }
}

// Backward over [lo, hi), given the gradient g of the combination per element:
//   update:   g = grad
//   residual: g = scale[s] (sum_j c_j T_j - y),  d target = -g
// writes dT_j = c[s, j] g and adds dc_j = sum_i g T_j into sums[slot * k + j], where slot is
// s - lo / len with per-sample coefficients and 0 with shared ones (one sum over the range).
template <typename scalar_t, typename acc_t>
void backward_range(const Args<scalar_t, acc_t>& p, bool residual, int64_t lo, int64_t hi,
                    double* sums) {
  acc_t g[kTile];
  const int64_t s0 = lo / p.len;
  const int64_t k = p.k;
  for (int64_t a = lo; a < hi; a += kTile) {
    const int64_t m = std::min(kTile, hi - a);
    if (residual) {
      combine(p, a, m, g);
      for (int64_t i = 0; i < m; ++i) g[i] -= static_cast<acc_t>(p.y[a + i]);
      for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
        const acc_t f = p.scale[s];
        for (int64_t i = o; i < o + r; ++i) g[i] *= f;
      });
      if (p.gy != nullptr)
        for (int64_t i = 0; i < m; ++i) p.gy[a + i] = static_cast<scalar_t>(-g[i]);
    } else {
      for (int64_t i = 0; i < m; ++i) g[i] = static_cast<acc_t>(p.grad[a + i]);
    }
    if (p.gterm[0] != nullptr) {
      for (int64_t j = 0; j < k; ++j) {
        scalar_t* dst = p.gterm[j] + a;
        if (!p.per_sample) {
          const acc_t cj = p.c[j];
          for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<scalar_t>(cj * g[i]);
        } else {
          for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
            const acc_t cj = p.c[s * k + j];
            for (int64_t i = o; i < o + r; ++i) dst[i] = static_cast<scalar_t>(cj * g[i]);
          });
        }
      }
    }
    if (sums != nullptr) {
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* tj = p.term[j] + a;
        if (!p.per_sample) {
          sums[j] += dot(g, tj, m);
        } else {
          for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
            sums[(s - s0) * k + j] += dot(g + o, tj + o, r);
          });
        }
      }
    }
  }
}
