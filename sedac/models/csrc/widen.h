// One head's K or V row of a KV pool as fp32 (paged_attention.cpp, prefill_attention.cpp).
#pragma once
#include <torch/extension.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

// One head's K or V row as fp32: read in place when the pool is fp32, else widened into buf [D].
inline const float* widen(const float* row, float*, int64_t) { return row; }
inline const float* widen(const at::Half* row, float* buf, int64_t D) {
  int64_t d = 0;
#if defined(__F16C__)
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
#endif
  for (; d < D; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}
inline const float* widen(const at::BFloat16* row, float* buf, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}
