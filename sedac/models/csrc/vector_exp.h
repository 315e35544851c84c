// exp(x) for x <= 0 (softmax numerators, sigmoids): Cephes' expf polynomial (within 2 ulp), one body for a
// float and for 8 or 16 of them in an AVX2 or AVX-512 register; std::exp one value at a time was ~20 cycles
// per attention score and ~3.5 ns per SiLU input (5.5 us of a SmolLM2 layer's ~120 at batch 1).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sedac_exp {

inline float vmax(float a, float b) { return std::max(a, b); }
inline float vfloor(float a) { return std::floor(a); }
inline float pow2(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
#if defined(__AVX2__)
inline __m256 vmax(__m256 a, float b) { return _mm256_max_ps(a, _mm256_set1_ps(b)); }
inline __m256 vfloor(__m256 a) { return _mm256_floor_ps(a); }
inline __m256 pow2(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#endif
#if defined(__AVX512F__)
inline __m512 vmax(__m512 a, float b) { return _mm512_max_ps(a, _mm512_set1_ps(b)); }
inline __m512 vfloor(__m512 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline __m512 pow2(__m512 n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#endif

template <class V>
inline V exp_nonpositive(V x) {
  x = vmax(x, -87.f);                                             // 2^n stays a normal float
  const V n = vfloor(x * 1.44269504f + 0.5f);
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;        // x - n ln 2, in two parts
  V y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return (y * (r * r) + r + 1.f) * pow2(n);
}

}  // namespace sedac_exp
