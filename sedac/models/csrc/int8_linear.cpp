// Weight-only int8 linear for CPU draft passes: y = (x @ w.T) * scale (+ bias), x fp32, w int8.
//
// Why: a CPU decode streams every weight once per step at memory bandwidth, so a pass over int8
// weights reads a quarter of the bytes of fp32. Lossless mode drafts with this int8 copy of the
// model and verifies at full precision. The activations stay fp32 (only the weights are rounded):
// quantizing activations too (fbgemm's dynamic int8) cost SmolLM2 40 points of draft agreement,
// its hidden states have outlier channels. oneDNN and torch._weight_int8pack_mm measured slower than
// fp32 at 1-8 rows on AVX2, hence this kernel.
#include "kernels.h"
#include <ATen/Parallel.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;   // weight rows converted per step, shared by up to kCols rows of x
constexpr int64_t kCols = 3;   // 4 x 3 accumulators + 4 weights + 1 x: within AVX2's 16 registers

// out[c * kRows + r] = sum_i w[r][i] * x[c][i] for kRows weight rows from w (row stride n) and
// C rows of x (row stride n): each weight is loaded and converted once for all C rows.
template <int C>
inline void dot_tile(const int8_t* w, const float* x, int64_t n, float* out) {
  int64_t i = 0;
#ifdef __AVX2__
  __m256 acc[C][kRows];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < kRows; ++r) acc[c][r] = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r)
      wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * n + i))));
    for (int c = 0; c < C; ++c) {
      const __m256 xv = _mm256_loadu_ps(x + c * n + i);
      for (int r = 0; r < kRows; ++r) acc[c][r] = _mm256_fmadd_ps(wv[r], xv, acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < kRows; ++r) {
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[c][r]), _mm256_extractf128_ps(acc[c][r], 1));
      const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
      out[c * kRows + r] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
#else
  for (int k = 0; k < C * kRows; ++k) out[k] = 0.f;
#endif
  for (; i < n; ++i)
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < kRows; ++r) out[c * kRows + r] += (float)w[r * n + i] * x[c * n + i];
}

// One full group of kRows weight rows against x rows [first, first + C).
inline void dot_group(const int8_t* w, const float* x, int64_t n, int64_t c, float* out) {
  switch (c) {
    case 1: return dot_tile<1>(w, x, n, out);
    case 2: return dot_tile<2>(w, x, n, out);
    default: return dot_tile<kCols>(w, x, n, out);
  }
}

}  // namespace

// x [T, in] fp32, weight [out, in] int8, scale [out] fp32, bias [out] or none -> [T, out] fp32.
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                          const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "int8_linear: x float32 [T, in]");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.size(1) == x.size(1),
              "int8_linear: weight int8 [out, in]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == weight.size(0), "int8_linear: scale float32 [out]");
  const int64_t t = x.size(0), n = x.size(1), m = weight.size(0);
  auto y = torch::empty({t, m}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int8_t* wp = weight.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (m + kRows - 1) / kRows, 16, [&](int64_t b, int64_t e) {
    float acc[kCols * kRows];
    for (int64_t g = b; g < e; ++g) {
      const int64_t o = g * kRows, rows = std::min(kRows, m - o);
      for (int64_t r = 0; r < t; r += kCols) {
        const int64_t cols = std::min(kCols, t - r);
        if (rows == kRows) {
          dot_group(wp + o * n, xp + r * n, n, cols, acc);
        } else {   // the last, partial group of weight rows
          for (int64_t c = 0; c < cols; ++c)
            for (int64_t k = 0; k < rows; ++k) {
              acc[c * kRows + k] = 0.f;
              for (int64_t i = 0; i < n; ++i) acc[c * kRows + k] += (float)wp[(o + k) * n + i] * xp[(r + c) * n + i];
            }
        }
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t k = 0; k < rows; ++k)
            yp[(r + c) * m + o + k] = acc[c * kRows + k] * sp[o + k] + (bp ? bp[o + k] : 0.f);
      }
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.impl("int8_linear", torch::kCPU, &int8_linear);
}
