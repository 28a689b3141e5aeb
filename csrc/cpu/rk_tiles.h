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
// residual factor, per-sample sums) are looked up per run of one sample inside the tile, or,
// for short samples, spread over a tile of whole samples (see expand).
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

// Conversions between the storage type and the math type. float / double: plain casts. To the math
// type: bfloat16 is the upper half of a float (bit arithmetic, where c10's conversion would branch, so
// that loops of it vectorise, also those reading several inputs element by element); float16 through
// F16C in the AVX2 build (the same round to nearest even as c10's software conversion, used by the
// baseline build; only NaN payloads may differ). To bfloat16: c10's round to nearest even (NaN to
// 0x7FC0) as branch-free bit arithmetic.
template <typename acc_t, typename scalar_t>
inline acc_t math_value(const scalar_t& v) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
#ifdef BX_TILES_F16C
  } else if constexpr (std::is_same<scalar_t, c10::Half>::value) {
    return _cvtsh_ss(v.x);
#endif
  } else {
    return static_cast<acc_t>(v);
  }
}

template <typename acc_t, typename scalar_t>
inline void to_math(acc_t* dst, const scalar_t* src, int64_t m) {
  for (int64_t i = 0; i < m; ++i) dst[i] = math_value<acc_t>(src[i]);
}
template <typename acc_t, typename scalar_t>
inline void store(scalar_t* dst, const acc_t* x, int64_t m) {
  for (int64_t i = 0; i < m; ++i) dst[i] = static_cast<scalar_t>(x[i]);
}
inline void store(c10::BFloat16* dst, const float* x, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof(u));
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    dst[i].x = (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
}
#ifdef BX_TILES_F16C
inline void to_math(float* dst, const c10::Half* src, int64_t m) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < m; ++i) dst[i] = _cvtsh_ss(src[i].x);
}
inline void store(c10::Half* dst, const float* x, int64_t m) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < m; ++i) dst[i].x = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

// A tile of src in the math type: src itself when it is stored in that type, else converted into buf.
template <typename acc_t, typename scalar_t>
inline const acc_t* math_tile(const scalar_t* src, int64_t m, acc_t* buf) {
  if constexpr (std::is_same<acc_t, scalar_t>::value) {
    return src;
  } else {
    to_math(buf, src, m);
    return buf;
  }
}

// Where a tile of results for dst is computed: dst itself when it is stored in the math type (and
// does not alias an input), else buf, then written with finish_tile.
template <typename acc_t, typename scalar_t>
inline acc_t* result_tile(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same<acc_t, scalar_t>::value) {
    return dst;
  } else {
    return buf;
  }
}
template <typename acc_t, typename scalar_t>
inline void finish_tile(scalar_t* dst, const acc_t* x, int64_t m) {
  if constexpr (!std::is_same<acc_t, scalar_t>::value) store(dst, x, m);
}

// x[0:r) = sum_{j < K} c[j] t_j[off : off + r)   (FIRST)   or   x[0:r) += the same:
// up to eight terms per pass over the local buffer (combine_row: eight, combine_short: four), summed
// left to right.
template <int K, bool FIRST, typename acc_t, typename scalar_t>
inline void combine_group(acc_t* x, const acc_t* c, const scalar_t* const* t, int64_t off, int64_t r) {
  acc_t cj[K];
  const scalar_t* tj[K];
  for (int j = 0; j < K; ++j) {
    cj[j] = c[j];
    tj[j] = t[j] + off;
  }
  int64_t i = 0;
#ifdef BX_TILES_F16C
  if constexpr (std::is_same<scalar_t, float>::value) {
    for (; i + 8 <= r; i += 8) {
      __m256 v = _mm256_mul_ps(_mm256_set1_ps(cj[0]), _mm256_loadu_ps(tj[0] + i));
      if (!FIRST) v = _mm256_add_ps(_mm256_loadu_ps(x + i), v);
      for (int j = 1; j < K; ++j) v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_set1_ps(cj[j]), _mm256_loadu_ps(tj[j] + i)));
      _mm256_storeu_ps(x + i, v);
    }
  }
  if constexpr (std::is_same<scalar_t, c10::Half>::value) {
    // F16C converts 8 at a time, which the compiler does not do for a loop of scalar conversions;
    // the same products and sums in the same order as the loop below
    const auto half8 = [](const c10::Half* q) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    };
    for (; i + 8 <= r; i += 8) {
      __m256 v = _mm256_mul_ps(_mm256_set1_ps(cj[0]), half8(tj[0] + i));
      if (!FIRST) v = _mm256_add_ps(_mm256_loadu_ps(x + i), v);
      for (int j = 1; j < K; ++j) v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_set1_ps(cj[j]), half8(tj[j] + i)));
      _mm256_storeu_ps(x + i, v);
    }
  }
#endif
  for (; i < r; ++i) {
    acc_t v = FIRST ? cj[0] * math_value<acc_t>(tj[0][i]) : x[i] + cj[0] * math_value<acc_t>(tj[0][i]);
    for (int j = 1; j < K; ++j) v += cj[j] * math_value<acc_t>(tj[j][i]);
    x[i] = v;
  }
}

// combine_group with a coefficient row per sample of LEN elements: x[i] (+)= sum_{j < K}
// c[(i / LEN) stride + j] T_j[off + i]. When the row is exactly this group (stride == K) the stride is
// passed as a constant: with the sample and row lengths known, the compiler reads the rows as
// interleaved vectors.
template <int K, bool FIRST, int LEN, typename acc_t, typename scalar_t, typename stride_t>
inline void combine_rows_loop(acc_t* x, const acc_t* c, stride_t stride, const scalar_t* const* t, int64_t off,
                              int64_t r) {
  const scalar_t* tj[K];
  for (int j = 0; j < K; ++j) tj[j] = t[j] + off;
  for (int64_t i = 0; i < r; ++i) {
    const acc_t* ci = c + (i / LEN) * stride;
    acc_t v = FIRST ? ci[0] * math_value<acc_t>(tj[0][i]) : x[i] + ci[0] * math_value<acc_t>(tj[0][i]);
    for (int j = 1; j < K; ++j) v += ci[j] * math_value<acc_t>(tj[j][i]);
    x[i] = v;
  }
}
template <int K, bool FIRST, int LEN, typename acc_t, typename scalar_t>
inline void combine_rows(acc_t* x, const acc_t* c, int64_t stride, const scalar_t* const* t, int64_t off,
                         int64_t r) {
  if (stride == K) {
    combine_rows_loop<K, FIRST, LEN>(x, c, std::integral_constant<int64_t, K>{}, t, off, r);
  } else {
    combine_rows_loop<K, FIRST, LEN>(x, c, stride, t, off, r);
  }
}

// Calls f(K, FIRST, j) for each group of up to G (4 or 8) terms j .. j + K - 1 of k, K and FIRST (j == 0)
// as std::integral_constant, so that f can pass them on as template arguments
template <int G, typename F>
inline void for_groups(int64_t k, const F& f) {
  static_assert(G == 4 || G == 8, "groups of four or eight terms");
  using std::integral_constant;
  const auto call = [&](auto K, int64_t j) {
    j == 0 ? f(K, std::true_type{}, j) : f(K, std::false_type{}, j);
  };
  for (int64_t j = 0; j < k; j += G) {
    switch (std::min<int64_t>(G, k - j)) {
      case 1: call(integral_constant<int, 1>{}, j); break;
      case 2: call(integral_constant<int, 2>{}, j); break;
      case 3: call(integral_constant<int, 3>{}, j); break;
      case 4: call(integral_constant<int, 4>{}, j); break;
      case 5: if constexpr (G == 8) call(integral_constant<int, 5>{}, j); break;
      case 6: if constexpr (G == 8) call(integral_constant<int, 6>{}, j); break;
      case 7: if constexpr (G == 8) call(integral_constant<int, 7>{}, j); break;
      default: if constexpr (G == 8) call(integral_constant<int, 8>{}, j); break;
    }
  }
}

// x[0:m) = sum_j c[s(i), j] T_j[a + i] for samples of LEN elements, a tile starting at a sample boundary
template <int LEN, typename acc_t, typename scalar_t>
inline void combine_short(acc_t* x, const acc_t* c, int64_t k, const scalar_t* const* t, int64_t a, int64_t m) {
  const acc_t* row = c + (a / LEN) * k;
  for_groups<4>(k, [&](auto K, auto first, int64_t j) {
    combine_rows<decltype(K)::value, decltype(first)::value, LEN>(x, row + j, k, t + j, a, m);
  });
}

// x[0:r) = sum_j c[j] T_j[off : off + r) for one coefficient row c
template <typename acc_t, typename scalar_t>
inline void combine_row(acc_t* x, const acc_t* c, const scalar_t* const* t, int64_t k, int64_t off,
                        int64_t r) {
  for_groups<8>(k, [&](auto K, auto first, int64_t j) {
    combine_group<decltype(K)::value, decltype(first)::value>(x, c + j, t + j, off, r);
  });
}

// Short samples (len < kShortLen, rk_kernels.cpp; below 8 the per-run loops measured slower): a
// loop per sample would run a few elements, so tiles hold whole samples (p.tile elements, a
// multiple of len; ranges start at sample boundaries) and the loops below take the sample length
// as a template argument: the compiler unrolls one sample's few elements.

// Calls f(LEN) with the sample length 1 .. kShortLen - 1 as a std::integral_constant
template <typename F>
inline void for_short_len(int64_t len, const F& f) {
  using std::integral_constant;
  static_assert(kShortLen == 8, "one case per short length");
  switch (len) {
    case 1: f(integral_constant<int, 1>{}); break;
    case 2: f(integral_constant<int, 2>{}); break;
    case 3: f(integral_constant<int, 3>{}); break;
    case 4: f(integral_constant<int, 4>{}); break;
    case 5: f(integral_constant<int, 5>{}); break;
    case 6: f(integral_constant<int, 6>{}); break;
    default: f(integral_constant<int, 7>{}); break;
  }
}

// dst[i] = v[s(i) stride] src[i] for the tile's m / LEN whole samples, s(i) = i / LEN counted from
// the tile's first sample (v points at its value); dst may be src.
template <int LEN, typename acc_t>
inline void scale_samples_of(acc_t* dst, const acc_t* v, int64_t stride, const acc_t* src, int64_t m) {
  const int64_t count = m / LEN;
  for (int64_t s = 0; s < count; ++s) {
    const acc_t f = v[s * stride];
    for (int r = 0; r < LEN; ++r) dst[s * LEN + r] = f * src[s * LEN + r];
  }
}
template <typename acc_t>
inline void scale_samples(acc_t* dst, const acc_t* v, int64_t stride, const acc_t* src, int64_t len, int64_t m) {
  for_short_len(len, [&](auto L) { scale_samples_of<decltype(L)::value>(dst, v, stride, src, m); });
}

// sums[s * stride] += sum_r x[s len + r] y[s len + r] for each of the tile's m / len whole samples s:
// r in order, from zero, each product rounded to the math type before it is added (the bits of dot()
// on runs shorter than 32). The sample length is a template argument, so that the compiler unrolls a
// sample's few products; the products are not stored, as a loop over all samples per r would need.
// A stride of 1 (the residual's sums) is passed as a constant: the sums are then contiguous and the loop
// vectorises (at one element per sample it ran at half torch.compile's speed with a variable stride).
template <int LEN, typename acc_t, typename stride_t>
inline void sum_products_of(const acc_t* x, const acc_t* y, int64_t m, double* sums, stride_t stride) {
  const int64_t count = m / LEN;
  for (int64_t s = 0; s < count; ++s) {
    acc_t acc = 0;
    for (int r = 0; r < LEN; ++r) acc += x[s * LEN + r] * y[s * LEN + r];
    sums[s * stride] += static_cast<double>(acc);
  }
}
template <typename acc_t>
inline void sum_products(const acc_t* x, const acc_t* y, int64_t len, int64_t m, double* sums, int64_t stride) {
  for_short_len(len, [&](auto L) {
    if (stride == 1) {
      sum_products_of<decltype(L)::value>(x, y, m, sums, std::integral_constant<int64_t, 1>{});
    } else {
      sum_products_of<decltype(L)::value>(x, y, m, sums, stride);
    }
  });
}

// x[0:m) = sum_j c[s(i), j] T_j[a + i]: the combination every op starts from.
template <typename scalar_t, typename acc_t>
inline void combine(const Args<scalar_t, acc_t>& p, int64_t a, int64_t m, acc_t* x) {
  if (!p.per_sample) {
    combine_row(x, p.c, p.term, p.k, a, m);
  } else if (p.len < kShortLen) {
    // a row of coefficients per sample of a few elements: strided reads, with the sample length
    // and the row length known to the compiler, which then vectorises them
    for_short_len(p.len, [&](auto L) { combine_short<decltype(L)::value>(x, p.c, p.k, p.term, a, m); });
  } else {
    for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
      combine_row(x + o, p.c + s * p.k, p.term, p.k, a + o, r);
    });
  }
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
  acc_t buf[kTile];
  for (int64_t a = lo; a < hi; a += p.tile) {
    const int64_t m = std::min(p.tile, hi - a);
    // stored in the math type: combined straight into out (a copy from a local tile cost a third of
    // the time at 4M elements). out may be a term itself: every loop of combine reads element i of
    // the terms before it writes element i, and partial overlaps are refused (update_out).
    acc_t* x = result_tile(p.out + a, buf);
    combine(p, a, m, x);
    finish_tile(p.out + a, x, m);
  }
}

// sums[s - lo / len] += sum over the range's elements of sample s of (sum_j c_j T_j - y)^2
template <typename scalar_t, typename acc_t>
void residual_range(const Args<scalar_t, acc_t>& p, int64_t lo, int64_t hi, double* sums) {
  acc_t x[kTile], yb[kTile];
  const int64_t s0 = lo / p.len;
  for (int64_t a = lo; a < hi; a += p.tile) {
    const int64_t m = std::min(p.tile, hi - a);
    combine(p, a, m, x);
    const acc_t* y = math_tile(p.y + a, m, yb);
    for (int64_t i = 0; i < m; ++i) x[i] -= y[i];
    if (p.len < kShortLen) {
      sum_products(x, x, p.len, m, sums + (a / p.len - s0), 1);
    } else {
      for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) { sums[s - s0] += dot(x + o, x + o, r); });
    }
  }
}

// r[lo:hi) = |sum_j c_j T_j - y| for samples of one element: their RMS, elementwise over whole tiles with
// no per-sample sums. The same bits as residual_range and rms_from_sums: the square rounded to the math
// type, then its root (the sum of one product from zero, and its mean over one element, are exact).
template <typename scalar_t, typename acc_t>
void residual_single_range(const Args<scalar_t, acc_t>& p, int64_t lo, int64_t hi, scalar_t* r) {
  acc_t x[kTile], yb[kTile];
  for (int64_t a = lo; a < hi; a += p.tile) {
    const int64_t m = std::min(p.tile, hi - a);
    combine(p, a, m, x);
    const acc_t* y = math_tile(p.y + a, m, yb);
    for (int64_t i = 0; i < m; ++i) {
      const acc_t d = x[i] - y[i];
      x[i] = std::sqrt(d * d);
    }
    store(r + a, x, m);
  }
}

// r[s] = sqrt(sums[s] / len) for s < m: the RMS of each sample from its sum of squares, the mean in
// double, the root in the math type (a float root of 8 lanes costs a quarter of a double one, and
// the result is stored in float or narrower anyway). The mean over zero elements is NaN, as in
// torch's mean(). Built with -fno-math-errno, so this loop vectorises.
template <typename scalar_t>
inline void rms_from_sums(scalar_t* r, const double* sums, int64_t m, int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  const double n = static_cast<double>(len);
  for (int64_t s = 0; s < m; ++s) r[s] = static_cast<scalar_t>(std::sqrt(static_cast<acc_t>(sums[s] / n)));
}

// Backward over [lo, hi), given the gradient g of the combination per element:
//   update:   g = grad
//   residual: g = scale[s] (sum_j c_j T_j - y),  d target = -g
// writes dT_j = c[s, j] g and adds dc_j = sum_i g T_j into sums[slot * k + j], where slot is
// s - lo / len with per-sample coefficients and 0 with shared ones (one sum over the range).
template <typename scalar_t, typename acc_t>
void backward_range(const Args<scalar_t, acc_t>& p, bool residual, int64_t lo, int64_t hi,
                    double* sums) {
  acc_t gb[kTile];  // the gradient g, when it is computed or converted
  acc_t w[kTile];   // a coefficient, product or gradient per element
  acc_t tb[kTile];  // an input converted to the math type
  const int64_t s0 = lo / p.len;
  const int64_t k = p.k;
  const bool short_runs = p.per_sample && p.len < kShortLen;
  for (int64_t a = lo; a < hi; a += p.tile) {
    const int64_t m = std::min(p.tile, hi - a);
    const acc_t* g = gb;  // the update's incoming gradient is read in place when stored in the math type
    if (residual) {
      combine(p, a, m, gb);
      const acc_t* y = math_tile(p.y + a, m, tb);
      for (int64_t i = 0; i < m; ++i) gb[i] -= y[i];
      if (p.len < kShortLen) {
        scale_samples(gb, p.scale + a / p.len, 1, gb, p.len, m);
      } else {
        for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
          const acc_t f = p.scale[s];
          for (int64_t i = o; i < o + r; ++i) gb[i] *= f;
        });
      }
      if (p.gy != nullptr) {
        acc_t* gy = result_tile(p.gy + a, w);
        for (int64_t i = 0; i < m; ++i) gy[i] = -gb[i];
        finish_tile(p.gy + a, gy, m);
      }
    } else {
      g = math_tile(p.grad + a, m, gb);
    }
    if (p.gterm[0] != nullptr) {
      for (int64_t j = 0; j < k; ++j) {
        scalar_t* dst = p.gterm[j] + a;  // a fresh output: aliases nothing
        acc_t* d = result_tile(dst, w);
        if (!p.per_sample) {
          const acc_t cj = p.c[j];
          for (int64_t i = 0; i < m; ++i) d[i] = cj * g[i];
        } else if (short_runs) {
          scale_samples(d, p.c + (a / p.len) * k + j, k, g, p.len, m);
        } else {
          for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
            const acc_t cj = p.c[s * k + j];
            for (int64_t i = o; i < o + r; ++i) d[i] = cj * g[i];
          });
        }
        finish_tile(dst, d, m);
      }
    }
    if (sums != nullptr) {
      for (int64_t j = 0; j < k; ++j) {
        const acc_t* tj = math_tile(p.term[j] + a, m, tb);
        if (!p.per_sample) {
          sums[j] += dot(g, tj, m);
        } else if (short_runs) {
          sum_products(g, tj, p.len, m, sums + (a / p.len - s0) * k + j, k);
        } else {
          for_runs(p.len, a, m, [&](int64_t s, int64_t o, int64_t r) {
            sums[(s - s0) * k + j] += dot(g + o, tj + o, r);
          });
        }
      }
    }
  }
}
