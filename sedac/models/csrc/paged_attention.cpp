// Paged decode attention for CPU: one query token per sequence, K/V read straight from the block pool.
//
// Why: the portable path gathers each sequence's blocks into a contiguous copy and then runs SDPA,
// so every step reads the KV cache, writes a copy and reads it again. Here K/V rows are read in place.
// Work is split as flash-decoding does: a task is one sequence's KV head (its G query heads share each
// K and V row load) over a span of kSpan positions, keeping a partial softmax (max, sum, G x D
// weighted values); the spans are merged after. At batch 1 and 1,500 positions, one task per query
// head over all positions left one of two threads idle a third of the time and ran at ~6 GB/s
// (attention was 12 of a 19 ms int4 token). Span boundaries are fixed positions, so a row's result
// is the same alone or in any batch. A half-precision pool (`kv_cache_dtype`) is widened in registers,
// so a step streams half the KV bytes. Head sizes 64 and 128 on AVX-512 reduce 16 scores at a time
// (attend_span_avx512): with one horizontal sum per score, an fp16 pool decoded int4 SmolLM2 at 1,024
// positions no faster than fp32 (124 vs 123 tok/s); after, 154 vs 126. At 16 sequences of 60-300 positions
// (fp16 pool, SmolLM2's heads) a call took 109-120 us with the pool in cache; 72-80 us after four positions'
// score chains interleaved, a KV head's query heads shared one V pass, a vector max and reused buffers.
#include "kernels.h"
#include "parallel_tasks.h"
#include "vector_exp.h"
#include "widen.h"
#include <ATen/Parallel.h>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using sedac_exp::exp_nonpositive;

constexpr int64_t kSpan = 64;    // positions per task

// q . k over one head's D dims.
inline float dot(const float* q, const float* k, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {   // explicit FMAs and one tree reduction: the file is built with -ffp-contract=off
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    for (int64_t d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += q[d] * k[d];
  return acc;
}

// acc[0, D) += w * v[0, D)
inline void axpy(float w, const float* v, float* acc, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(v + d), _mm512_loadu_ps(acc + d)));
    return;
  }
#endif
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += w * v[d];
}

// s[i] = exp(s[i] - m) over [0, n); returns their sum.
inline float exp_shifted(float* s, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 sums = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp_nonpositive(_mm512_loadu_ps(s + i) - m);
    _mm512_storeu_ps(s + i, e);
    sums += e;
  }
  sum = _mm512_reduce_add_ps(sums);
#endif
  for (; i < n; ++i) sum += (s[i] = exp_nonpositive(s[i] - m));
  return sum;
}

// f(position, slot) for positions [first, last) of a sequence whose block table is `table`, a block at
// a time (no division per position). Entering a block, the next one's rows (slot_bytes each, from
// `pool`) are prefetched: blocks lie anywhere in the pool, and waiting on each one's first lines left the
// stream at ~10 GB/s.
template <class F>
inline void for_each_slot(const int64_t* table, int64_t first, int64_t last, int64_t block_size, const char* pool,
                          int64_t slot_bytes, F&& f) {
  for (int64_t p = first; p < last;) {
    const int64_t block = p / block_size, base = table[block] * block_size - block * block_size;   // slot - position
    const int64_t end = std::min(last, (block + 1) * block_size);
    for (int64_t ahead = (p == first ? 1 : 2); ahead <= 2; ++ahead) {
      const int64_t from = (block + ahead) * block_size;
      if (from >= last) break;
      const char* next = pool + table[block + ahead] * block_size * slot_bytes;
      for (int64_t byte = 0; byte < std::min(last - from, block_size) * slot_bytes; byte += 64)
        __builtin_prefetch(next + byte);
    }
    for (; p < end; ++p) f(p, base + p);
  }
}

// Where a span's partial softmax goes: max [H], sum [H], weighted values [H, D] (not yet divided).
struct Partial {
  float* max;
  float* sum;
  float* acc;
};

// max of s[0, n): 16 at a time on AVX-512 (softmax_numerators with std::max_element's scalar loop took 11% of
// the kernel's perf samples at 16 sequences, 9% after).
inline float max_of(const float* s, int64_t n) {
#if defined(__AVX512F__)
  int64_t i = 0;
  __m512 v = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (; i + 16 <= n; i += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(s + i));
  if (i < n) v = _mm512_max_ps(v, _mm512_mask_loadu_ps(v, static_cast<__mmask16>((1u << (n - i)) - 1), s + i));
  return _mm512_reduce_max_ps(v);
#else
  return *std::max_element(s, s + n);
#endif
}

// scores [H, n] -> exp(score - its head's max) in place, the maxes and sums into out, out.acc [H, D] zeroed.
inline void softmax_numerators(float* scores, int64_t H, int64_t n, int64_t D, Partial out) {
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores + h * n;
    const float m = max_of(s, n);
    out.max[h] = m;
    out.sum[h] = exp_shifted(s, n, m);
  }
  std::fill(out.acc, out.acc + H * D, 0.f);
}

// Every query head q [H, D] over positions [first, last) of one sequence: scores, their softmax
// numerators and the weighted V rows, into `out`. Positions outer, KV heads inner: each slot's K (then
// V) row of all KV heads is read front to back, and a block's slots lie together, so the pool streams.
template <class T, class Dim>
void attend_span(const float* q, int64_t H, int64_t KV, Dim head_dim, const T* k_pool, const T* v_pool,
                 const int64_t* table, int64_t first, int64_t last, int64_t block_size, float scale, Partial out) {
  const int64_t n = last - first, G = H / KV, D = head_dim;     // D a compile-time constant for common head sizes
  std::vector<float> scores(H * n), buf(D);                            // [H, n]
  const int64_t slot_bytes = KV * D * sizeof(T);
  for_each_slot(table, first, last, block_size, reinterpret_cast<const char*>(k_pool), slot_bytes, [&](int64_t p, int64_t slot) {
    for (int64_t kv = 0; kv < KV; ++kv) {
      const float* k = widen(k_pool + (slot * KV + kv) * D, buf.data(), D);
      for (int64_t h = kv * G; h < (kv + 1) * G; ++h) scores[h * n + p - first] = dot(q + h * D, k, D) * scale;
    }
  });
  softmax_numerators(scores.data(), H, n, D, out);
  for_each_slot(table, first, last, block_size, reinterpret_cast<const char*>(v_pool), slot_bytes, [&](int64_t p, int64_t slot) {
    for (int64_t kv = 0; kv < KV; ++kv) {
      const float* v = widen(v_pool + (slot * KV + kv) * D, buf.data(), D);
      for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
        axpy(scores[h * n + p - first], v, out.acc + h * D, D);
      }
    }
  });
}

#if defined(__AVX512F__)
// 16 K or V values as fp32 (a half pool widened in registers).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// The totals of v[0..15]'s 16 lanes each, in some fixed lane order (sum16 puts them in order): four
// shuffle-and-add rounds for 16 reductions, where one _mm512_reduce_add_ps per score cost more than the
// score's 64 multiply-adds.
inline __m512 sum16_unordered(const __m512* v) {
  __m512 x[8], y[4], z[2];
  for (int j = 0; j < 8; ++j)   // low 256 bits: v[j]'s 8 partial sums, high: v[j + 8]'s
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 8], 0x44), _mm512_shuffle_f32x4(v[j], v[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)   // 128-bit quarters of 4 partial sums, of 4 vectors
    y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[j], x[j + 4], 0x88), _mm512_shuffle_f32x4(x[j], x[j + 4], 0xDD));
  for (int j = 0; j < 2; ++j)
    z[j] = _mm512_add_ps(_mm512_shuffle_ps(y[j], y[j + 2], 0x44), _mm512_shuffle_ps(y[j], y[j + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

// Lane j = the sum of v[j]'s lanes. The lane each total lands in is found once, by summing v[j] = j.
inline __m512 sum16(const __m512* v) {
  static const __m512i lane_of = [] {
    __m512 probe[16];
    for (int j = 0; j < 16; ++j) probe[j] = _mm512_set1_ps(static_cast<float>(j));
    alignas(64) float totals[16];
    _mm512_store_ps(totals, sum16_unordered(probe));
    alignas(64) int32_t lane[16];
    for (int l = 0; l < 16; ++l) lane[static_cast<int>(totals[l]) / 16] = l;
    return _mm512_load_si512(lane);
  }();
  return _mm512_permutexvar_ps(lane_of, sum16_unordered(v));
}

// Into L2 (the T1 hint): slightly faster than into L1 here, the score pass's prefetches queue behind each other.
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(row) + b, 0, 2);
}

// acc [R, D] = sum over the span's positions i, in order, of w[r * n + i] * V row i, for R query heads
// sharing one KV head (v: that head's row in slot 0, slot_stride apart): the sums stay in registers, where
// adding into L1 loaded and stored them for every position. The score pass has prefetched the rows.
template <int R, class T, int64_t D>
inline void weigh_values(const float* w, int64_t n, const T* v, const int64_t* slots, int64_t slot_stride, float* acc) {
  constexpr int C = D / 16;
  __m512 sums[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) sums[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const T* row = v + slots[i] * slot_stride;
    __m512 vc[C];
    for (int c = 0; c < C; ++c) vc[c] = load16(row + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 weight = _mm512_set1_ps(w[r * n + i]);
      for (int c = 0; c < C; ++c) sums[r][c] = _mm512_fmadd_ps(weight, vc[c], sums[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * D + 16 * c, sums[r][c]);
}

// attend_span for a head size D of 16-lane chunks on AVX-512. Positions outer and KV heads inner, as
// attend_span reads the pool; each K row is multiplied into its G query heads' partial sums, reduced 16
// positions at a time (sum16); V rows are widened in registers and added into the heads' sums in L1.
template <class T, int64_t D>
void attend_span_avx512(const float* q, int64_t H, int64_t KV, const T* k_pool, const T* v_pool, const int64_t* slots,
                        int64_t n, float scale, Partial out) {
  constexpr int C = D / 16;
  const int64_t G = H / KV, slot_bytes = KV * D * sizeof(T);
  // [H, n] scores, the queries times the scale [H, D], and [H, 16 positions] a dot product's 16 lanes each:
  // the thread's, reused (allocating and zeroing them cost a twentieth of a span)
  thread_local std::vector<float> scores, qs;
  thread_local std::vector<__m512> partial;
  scores.resize(H * n);
  qs.resize(H * D);
  partial.resize(H * 16);
  for (int64_t i = 0; i < H * D; ++i) qs[i] = q[i] * scale;
  for (int64_t i = 0; i < std::min<int64_t>(16, n); ++i) prefetch_row(k_pool + slots[i] * KV * D, slot_bytes);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t m = std::min<int64_t>(16, n - i);
    // P positions at a time: their scores' chains (each its C multiply-adds in order) interleave, where one
    // position's G chains of dependent multiply-adds waited on each other's latency.
    const auto score_positions = [&]<int P>(int64_t j) {
      for (int p = 0; p < P; ++p) {
        if (i + 16 + j + p < n) prefetch_row(k_pool + slots[i + 16 + j + p] * KV * D, slot_bytes);   // blocks lie anywhere
        prefetch_row(v_pool + slots[i + j + p] * KV * D, slot_bytes);   // the V pass then reads the span from cache
      }
      for (int64_t kv = 0; kv < KV; ++kv) {
        __m512 kc[P][C];
        for (int p = 0; p < P; ++p)
          for (int c = 0; c < C; ++c) kc[p][c] = load16(k_pool + (slots[i + j + p] * KV + kv) * D + 16 * c);
        for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
          __m512 acc[P];
          for (int p = 0; p < P; ++p) acc[p] = _mm512_mul_ps(_mm512_loadu_ps(qs.data() + h * D), kc[p][0]);
          for (int c = 1; c < C; ++c)
            for (int p = 0; p < P; ++p) acc[p] = _mm512_fmadd_ps(_mm512_loadu_ps(qs.data() + h * D + 16 * c), kc[p][c], acc[p]);
          for (int p = 0; p < P; ++p) partial[h * 16 + j + p] = acc[p];
        }
      }
    };
    constexpr int kPositions = D == 64 ? 4 : 2;   // their K rows in 16 registers
    int64_t j = 0;
    for (; j + kPositions <= m; j += kPositions) score_positions.template operator()<kPositions>(j);
    for (; j < m; ++j) score_positions.template operator()<1>(j);
    for (; j < 16; ++j)
      for (int64_t h = 0; h < H; ++h) partial[h * 16 + j] = _mm512_setzero_ps();
    for (int64_t h = 0; h < H; ++h)
      _mm512_mask_storeu_ps(scores.data() + h * n + i, static_cast<__mmask16>((1u << m) - 1), sum16(&partial[h * 16]));
  }
  softmax_numerators(scores.data(), H, n, D, out);
  // Up to 4 (D 64) or 2 query heads at a time, their sums in registers (16 of 32): all of a KV head's G
  // heads in one pass over its V rows where they fit (SmolLM2's 3 took three passes of one head before).
  constexpr int64_t kChunk = D == 64 ? 4 : 2;
  for (int64_t kv = 0; kv < KV; ++kv)
    for (int64_t h = kv * G; h < (kv + 1) * G; h += kChunk) {
      const T* v = v_pool + kv * D;
      float *w = scores.data() + h * n, *acc = out.acc + h * D;
      switch (std::min(kChunk, (kv + 1) * G - h)) {
        case 1: weigh_values<1, T, D>(w, n, v, slots, KV * D, acc); break;
        case 2: weigh_values<2, T, D>(w, n, v, slots, KV * D, acc); break;
        case 3: weigh_values<3, T, D>(w, n, v, slots, KV * D, acc); break;
        default: weigh_values<4, T, D>(w, n, v, slots, KV * D, acc);
      }
    }
}
#endif

// The heads of every sequence: q [B, H, D] fp32 against a pool of T [slots, KV, D] -> out [B, H, D].
template <class T>
void attend(const torch::Tensor& q, const T* kp, const T* vp, const int64_t* tp, const int64_t* lp, int64_t nb,
            int64_t KV, int64_t block_size, float scale, float* op) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const float* qp = q.data_ptr<float>();
  std::vector<int64_t> span_start(B + 1, 0);          // sequence b's spans are [span_start[b], span_start[b + 1])
  for (int64_t b = 0; b < B; ++b) span_start[b + 1] = span_start[b] + (lp[b] + kSpan - 1) / kSpan;
  const int64_t spans = span_start[B];
  // Each span's max, sum [span, H] and weighted values [span, H, D], every entry written by its span: the
  // calling thread's buffer, reused (zeroing ~90 KB a layer at 16 sequences cost as much as a span). Named
  // through pointers: in the workers' lambdas a thread_local's name would be each worker's own.
  thread_local std::vector<float> span_results;
  span_results.resize(spans * H * (D + 2));
  float *maxes = span_results.data(), *sums = maxes + spans * H, *accs = sums + spans * H;
  // Spans across threads with work stealing (parallel_tasks.h): a preempted thread holds up no one.
  sedac_panels::parallel_tasks(spans, [&](int64_t span) {
    const int64_t b = std::upper_bound(span_start.begin(), span_start.end(), span) - span_start.begin() - 1;
    const int64_t first = (span - span_start[b]) * kSpan, last = std::min(lp[b], first + kSpan);
    const Partial out{maxes + span * H, sums + span * H, accs + span * H * D};
#if defined(__AVX512F__)
    if (D == 64 || D == 128) {
      thread_local std::vector<int64_t> slots;   // position -> slot, once for every head
      slots.resize(last - first);
      for (int64_t p = first; p < last; ++p) slots[p - first] = tp[b * nb + p / block_size] * block_size + p % block_size;
      const float* qb = qp + b * q.stride(0);
      if (D == 64) attend_span_avx512<T, 64>(qb, H, KV, kp, vp, slots.data(), last - first, scale, out);
      else attend_span_avx512<T, 128>(qb, H, KV, kp, vp, slots.data(), last - first, scale, out);
      return;
    }
#endif
    // A loop of a runtime length per position and head cost more than its 64 multiply-adds.
    if (D == 64)
      attend_span(qp + b * q.stride(0), H, KV, std::integral_constant<int64_t, 64>{}, kp, vp, tp + b * nb, first,
                  last, block_size, scale, out);
    else if (D == 128)
      attend_span(qp + b * q.stride(0), H, KV, std::integral_constant<int64_t, 128>{}, kp, vp, tp + b * nb, first,
                  last, block_size, scale, out);
    else
      attend_span(qp + b * q.stride(0), H, KV, D, kp, vp, tp + b * nb, first, last, block_size, scale, out);
  });
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {   // merge each head's spans in order
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t span = span_start[b]; span < span_start[b + 1]; ++span) m = std::max(m, maxes[span * H + h]);
      float* o = op + i * D;
      std::fill(o, o + D, 0.f);
      for (int64_t span = span_start[b]; span < span_start[b + 1]; ++span) {
        const float w = std::exp(maxes[span * H + h] - m);
        const float* acc = accs + (span * H + h) * D;
        sum += w * sums[span * H + h];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
}

}  // namespace

// q [B, H, D] (rows may be strided); k_cache, v_cache [slots, KV, D]; tables [B, nb] block ids; lengths [B] context lengths
// -> [B, H, D]. Sequence b attends to its positions [0, lengths[b]); position p lives in slot
// tables[b][p / block_size] * block_size + p % block_size.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& tables,
                                     const torch::Tensor& lengths, int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_decode_attention: float32 queries, K and V caches of one dtype (float32, float16 or bfloat16)");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong,
              "paged_decode_attention: int64 tables and lengths");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              tables.is_contiguous() && lengths.is_contiguous(), "paged_decode_attention: contiguous inputs (q rows may be strided)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k_cache.size(1), nb = tables.size(1);
  TORCH_CHECK(H % KV == 0 && k_cache.size(2) == D, "paged_decode_attention: head shapes");
  TORCH_CHECK(lengths.size(0) == B && tables.size(0) == B, "paged_decode_attention: batch shapes");
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] > 0 && lp[b] <= nb * block_size, "paged_decode_attention: a length lies outside its block table");
  auto out = torch::empty({B, H, D}, q.options());   // dense, whatever q's row stride
  auto run = [&](auto* k_rows, auto* v_rows) {
    attend(q, k_rows, v_rows, tp, lp, nb, KV, block_size, (float)scale, out.data_ptr<float>());
  };
  switch (k_cache.scalar_type()) {
    case at::kFloat: run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>()); break;
    case at::kHalf: run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>()); break;
    case at::kBFloat16: run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "paged_decode_attention: KV caches must be float32, float16 or bfloat16");
  }
  return out;
}

TORCH_LIBRARY(sedac_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lengths, "
        "int block_size, float scale) -> Tensor");
  m.impl("paged_decode_attention", torch::kCPU, &paged_decode_attention);
}
