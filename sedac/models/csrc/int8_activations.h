// Activations quantized per row and group of inputs to two int8 levels (or one), for the integer dot products
// of block_linear_a8.cpp (4-bit codes) and int8_linear_a8.cpp (int8 weights), on AVX-512 VNNI.
// Per row and group: c = round(x / s) with s = max |x| / 127, and the residual in steps of s / 254,
// f = round((x - c s) / (s / 254)): x ~= (254 c + f) s / 254, a 15-bit grid (one int8 level, llama.cpp's,
// cost SmolLM2 5 points of greedy agreement, 0.949; two levels measured 1.000 in `make bench-precisions`).
// With one level (w4a8 and w8a8 engines: llama.cpp's Q8 activations) f = 0 and the kernels skip the fine
// dot products, half the vpdpbusd work of a batched step.
// Rows are quantized independently, so a row's result is the same alone or in any batch.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SEDAC_VNNI 1
#endif

namespace sedac_a8 {

constexpr int32_t kFine = 254;   // the residual's step: the coarse step / 254 (|residual| <= step / 2)
constexpr int64_t kAhead = 2048;   // bytes of codes the VNNI kernels' multi-row tiles prefetch ahead of their loads

struct QuantizedRows {
  std::vector<int8_t> coarse, fine;   // [T, n]: x ~= step * (254 * coarse + fine)
  std::vector<float> step, sum;       // [T, groups]: step = max |x| / 127 / 254, sum of x
  std::vector<int32_t> levels;        // [T, groups]: sum of 254 * coarse + fine (offset weight codes need it)
};

struct GroupSums {
  float step, sum;
  int32_t levels;
};

// One group of inputs v[0, group) -> coarse and fine codes (zeros with one level); returns its step and sums.
inline GroupSums quantize_group(const float* v, int64_t group, int8_t* coarse, int8_t* fine, int64_t num_levels) {
  const float fine_on = num_levels == 2 ? 1.f : 0.f;
#if SEDAC_VNNI
  if (group % 16 == 0) {   // the same steps on 16 lanes (sums in another order: bitwise per build, not per ISA)
    __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < group; k += 16) {
      const __m512 x = _mm512_loadu_ps(v + k);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(x));
      sum = _mm512_add_ps(sum, x);
    }
    const float a = _mm512_reduce_max_ps(amax), d = a / 127.f, inv = a > 0.f ? 127.f / a : 0.f;
    const __m512 vinv = _mm512_set1_ps(inv), vd = _mm512_set1_ps(d), fine_scale = _mm512_set1_ps(inv * kFine);
    __m512 levels = _mm512_setzero_ps();   // integers below 2^24: exact in any order
    for (int64_t k = 0; k < group; k += 16) {
      const __m512 x = _mm512_loadu_ps(v + k);
      const __m512 c = _mm512_roundscale_ps(_mm512_mul_ps(x, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(x, _mm512_mul_ps(c, vd)), fine_scale),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 bound = _mm512_set1_ps(127.f);
      const __m512 clamped = _mm512_mul_ps(_mm512_min_ps(_mm512_max_ps(f, -bound), bound), _mm512_set1_ps(fine_on));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(coarse + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(fine + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(clamped)));
      levels = _mm512_add_ps(levels, _mm512_fmadd_ps(c, _mm512_set1_ps(kFine), clamped));
    }
    return {d / kFine, _mm512_reduce_add_ps(sum), static_cast<int32_t>(_mm512_reduce_add_ps(levels))};
  }
#endif
  float amax = 0.f, sum = 0.f;
  for (int64_t k = 0; k < group; ++k) {
    amax = std::max(amax, std::abs(v[k]));
    sum += v[k];
  }
  const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t levels = 0;
  for (int64_t k = 0; k < group; ++k) {
    const float c = std::nearbyint(v[k] * inv);
    coarse[k] = static_cast<int8_t>(c);
    fine[k] = static_cast<int8_t>(fine_on * std::clamp(std::nearbyint((v[k] - c * d) * (inv * kFine)), -127.f, 127.f));
    levels += kFine * coarse[k] + fine[k];
  }
  return {d / kFine, sum, levels};
}

// x [t, n] quantized into the calling thread's buffers, reused call after call (allocating and zeroing five
// vectors was half of a ~0.9 us call at batch 1): valid until this thread's next call.
inline const QuantizedRows& quantize_rows(const float* x, int64_t t, int64_t n, int64_t group, int64_t num_levels) {
  TORCH_CHECK(num_levels == 1 || num_levels == 2, "activation levels: 1 (int8) or 2 (a 16-bit grid), got ", num_levels);
  const int64_t groups = n / group;
  thread_local QuantizedRows buffers;
  QuantizedRows& out = buffers;   // the caller's: a thread_local named inside the lambda would be each worker's own
  out.coarse.resize(t * n);
  out.fine.resize(t * n);
  out.step.resize(t * groups);
  out.sum.resize(t * groups);
  out.levels.resize(t * groups);
  at::parallel_for(0, t * groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = (i / groups) * n + (i % groups) * group;
      const GroupSums sums = quantize_group(x + first, group, out.coarse.data() + first, out.fine.data() + first, num_levels);
      out.step[i] = sums.step;
      out.sum[i] = sums.sum;
      out.levels[i] = sums.levels;
    }
  });
  return out;
}

// The exact integer sum(w(k) (254 coarse[k] + fine[k])) over one group [first, first + group): the
// scalar reference of the VNNI tiles.
template <class Weight>
inline int32_t group_dot(Weight&& w, const int8_t* coarse, const int8_t* fine, int64_t first, int64_t group) {
  int32_t sum = 0;
  for (int64_t k = first; k < first + group; ++k) sum += w(k) * (kFine * coarse[k] + fine[k]);
  return sum;
}

// y[r][16p + j] = the chain out = step(r, p, j, g, out) over groups g in order from 0: the scalar tiles.
template <int R, int P, class Step>
inline void scalar_tile(float* y, int64_t ldy, int64_t groups, Step&& step) {
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int j = 0; j < 16; ++j) {
        float out = 0.f;
        for (int64_t g = 0; g < groups; ++g) out = step(r, p, j, g, out);
        y[r * ldy + p * 16 + j] = out;
      }
}

#if SEDAC_VNNI
// A tile's R rows x P panels of 16 outputs from registers to y (row stride ldy).
template <int R, int P>
inline void store_tile(const __m512* out, float* y, int64_t ldy) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(y + r * ldy + p * 16, out[r * P + p]);
}

inline __m512i broadcast4(const int8_t* q) {   // four int8 activations into every 32-bit lane
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm512_set1_epi32(v);
}
#endif

}  // namespace sedac_a8
