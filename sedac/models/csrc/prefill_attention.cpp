// Causal attention of a prompt chunk over its sequence's paged K/V (CPU prefill), flash-attention style.
//
// Why: torch's CPU SDPA took 13.1 ms a layer for a 1,024-token SmolLM2 prompt (~44% of its prefill) and
// 273 us for a 96-token one, where the multiply-adds alone need ~6 and ~0.06 ms on 2 cores. Here a task is
// one KV head's query heads at a few consecutive positions: up to kRows query vectors that share every K
// and V load. The scores of 16 keys for those rows sit in one register each (per dim: one load of the keys'
// transposed dim, one broadcast multiply-add per row), then an online softmax per row, then the weighted
// values with the 16 V rows held in registers. K (transposed) and V are first widened to fp32 once per call.
#include "kernels.h"
#include "parallel_tasks.h"
#include "vector_exp.h"
#include "widen.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int64_t kKeys = 16;      // keys per score block: one register
constexpr int64_t kRows = 12;      // query vectors per task: 12 score registers, the keys' row, temporaries
constexpr int64_t kMaxDim = 256;   // head sizes the task's stack buffers hold
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Keys [0, Lp) of the sequence as fp32: kt [KV, D, Lp] (a key block's dim d is one vector), v [KV, Lp, D];
// positions >= L zero. Position p lives in slot blocks[p / block_size] * block_size + p % block_size.
// A task is one KV head's 16 positions: their K rows are transposed from fp32 rows (widen.h) so that each
// of kt's rows is written 16 contiguous values at a time.
template <class T>
void widen_keys(const T* k_pool, const T* v_pool, const int64_t* blocks, int64_t L, int64_t Lp, int64_t KV,
                int64_t D, int64_t block_size, float* kt, float* v) {
  static const float zeros[kMaxDim] = {};
  const int64_t spans = Lp / kKeys;
  sedac_panels::parallel_tasks(KV * spans, [&](int64_t task) {
    const int64_t kv = task / spans, first = task % spans * kKeys;
    alignas(64) float buf[kKeys * kMaxDim];
    const float* k_rows[kKeys];
    for (int64_t j = 0; j < kKeys; ++j) {
      const int64_t p = first + j;
      float* v_out = v + (kv * Lp + p) * D;
      if (p >= L) {
        k_rows[j] = zeros;
        std::fill(v_out, v_out + D, 0.f);
        continue;
      }
      const int64_t at = (blocks[p / block_size] * block_size + p % block_size) * KV + kv;
      k_rows[j] = widen(k_pool + at * D, buf + j * D, D);
      const float* v_row = widen(v_pool + at * D, v_out, D);
      if (v_row != v_out) std::copy(v_row, v_row + D, v_out);
    }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < kKeys; ++j) kt[(kv * D + d) * Lp + first + j] = k_rows[j][d];
  });
}

// s[m] = 16 keys' scores of query row m: qs [M, D] (scaled), keys kt[d * Lp + j] for the block's 16 keys j.
template <int M>
void block_scores(const float* qs, int64_t D, const float* kt, int64_t Lp, __m512* s) {
#pragma GCC unroll 12
  for (int m = 0; m < M; ++m) s[m] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k = _mm512_loadu_ps(kt + d * Lp);
#pragma GCC unroll 12
    for (int m = 0; m < M; ++m) s[m] = _mm512_fmadd_ps(_mm512_set1_ps(qs[m * D + d]), k, s[m]);
  }
}

// block_scores for rows (1..kRows) query vectors.
template <int M = kRows>
void scores(int64_t rows, const float* qs, int64_t D, const float* kt, int64_t Lp, __m512* s) {
  if constexpr (M > 1)
    if (rows < M) return scores<M - 1>(rows, qs, D, kt, Lp, s);
  block_scores<M>(qs, D, kt, Lp, s);
}

struct Rows {          // a task's query vectors: row m is head heads[m] at chunk row index[m]
  int64_t count, index[kRows], heads[kRows], positions[kRows];
};

// One task: rows of one KV head against keys [0, their position], written to out [T, H, D].
void attend_rows(const Rows& rows, const float* q, int64_t q_stride, const float* kt, const float* v, int64_t Lp,
                 int64_t D, int64_t H, float scale, float* out) {
  const int64_t M = rows.count;
  alignas(64) float qs[kRows * kMaxDim], o[kRows * kMaxDim], p[kRows * kKeys];
  float row_max[kRows], correction[kRows];
  __m512 row_sum[kRows];   // per lane: summed across lanes once at the end
  for (int64_t m = 0; m < M; ++m) {
    const float* qr = q + rows.index[m] * q_stride + rows.heads[m] * D;
    for (int64_t d = 0; d < D; ++d) qs[m * D + d] = qr[d] * scale;
    std::fill(o + m * D, o + (m + 1) * D, 0.f);
    row_max[m] = kNegInf;
    row_sum[m] = _mm512_setzero_ps();
  }
  const int64_t last = *std::max_element(rows.positions, rows.positions + M);
  __m512 s[kRows];
  for (int64_t j0 = 0; j0 <= last; j0 += kKeys) {
    scores(M, qs, D, kt + j0, Lp, s);
    for (int64_t m = 0; m < M; ++m) {   // online softmax: keys after the row's position masked out
      const int64_t visible = std::clamp<int64_t>(rows.positions[m] - j0 + 1, 0, kKeys);
      const __mmask16 keep = visible == kKeys ? __mmask16(0xffff) : __mmask16((1u << visible) - 1);
      const __m512 sm = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), keep, s[m]);
      const float top = std::max(row_max[m], _mm512_reduce_max_ps(sm));
      // once a row's maximum settles (most blocks), its running sums need no rescaling
      correction[m] = top == row_max[m] ? 1.f : row_max[m] == kNegInf ? 0.f : std::exp(row_max[m] - top);
      const __m512 e = _mm512_maskz_mov_ps(keep, sedac_exp::exp_nonpositive(_mm512_sub_ps(sm, _mm512_set1_ps(top))));
      row_sum[m] = _mm512_fmadd_ps(row_sum[m], _mm512_set1_ps(correction[m]), e);
      row_max[m] = top;
      _mm512_storeu_ps(p + m * kKeys, e);
    }
    const float* vb = v + j0 * D;
    for (int64_t c = 0; c < D; c += 16) {   // o[m] = o[m] * correction + sum_j p[m][j] v[j]
      __m512 vj[kKeys];
#pragma GCC unroll 16
      for (int j = 0; j < kKeys; ++j) vj[j] = _mm512_loadu_ps(vb + j * D + c);
      for (int64_t m = 0; m < M; ++m) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(o + m * D + c), _mm512_set1_ps(correction[m]));
#pragma GCC unroll 16
        for (int j = 0; j < kKeys; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[m * kKeys + j]), vj[j], acc);
        _mm512_storeu_ps(o + m * D + c, acc);
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float inv = 1.f / _mm512_reduce_add_ps(row_sum[m]);
    float* dst = out + (rows.index[m] * H + rows.heads[m]) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = o[m * D + d] * inv;
  }
}

// The largest divisor of G that fits a task (a KV head's query heads per task).
int64_t heads_per_task(int64_t G) {
  for (int64_t g = std::min(G, kRows); g > 1; --g)
    if (G % g == 0) return g;
  return 1;
}

}  // namespace

// q [T, H, D] fp32 (rows may be strided): the chunk's queries at positions start .. start + T - 1 of one
// sequence; k_cache, v_cache [slots, KV, D] (fp32, fp16 or bf16) holding its K/V at positions
// [0, start + T) (this chunk's included); blocks [nb] its block table -> [T, H, D], each row attending
// to the positions up to its own.
torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                const torch::Tensor& blocks, int64_t start, int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "prefill_attention: float32 queries [T, H, D] with dense rows");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              blocks.scalar_type() == at::kLong && blocks.is_contiguous(),
              "prefill_attention: contiguous K and V caches of one dtype, an int64 block table");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KV = k_cache.size(1), L = start + T;
  TORCH_CHECK(H % KV == 0 && k_cache.size(2) == D && D % 16 == 0 && D <= kMaxDim,
              "prefill_attention: head sizes a multiple of 16 up to 256, query heads a multiple of KV heads");
  TORCH_CHECK(start >= 0 && L <= blocks.size(0) * block_size, "prefill_attention: positions outside the block table");
  const int64_t Lp = (L + kKeys - 1) / kKeys * kKeys, G = H / KV, Gt = heads_per_task(G), Bq = kRows / Gt;
  thread_local std::vector<float> keys, values;   // reused: [KV, D, Lp] and [KV, Lp, D]
  keys.resize(KV * D * Lp);
  values.resize(KV * Lp * D);
  float *kt = keys.data(), *v = values.data();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  switch (k_cache.scalar_type()) {
    case at::kFloat: widen_keys(k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), bp, L, Lp, KV, D, block_size, kt, v); break;
    case at::kHalf: widen_keys(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), bp, L, Lp, KV, D, block_size, kt, v); break;
    case at::kBFloat16: widen_keys(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), bp, L, Lp, KV, D, block_size, kt, v); break;
    default: TORCH_CHECK(false, "prefill_attention: KV caches must be float32, float16 or bfloat16");
  }
  auto out = torch::empty({T, H, D}, q.options());
  const int64_t query_blocks = (T + Bq - 1) / Bq, head_groups = G / Gt;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Tasks by query block first: later positions cost more, and work stealing evens out the two halves.
  sedac_panels::parallel_tasks(query_blocks * KV * head_groups, [&](int64_t task) {
    const int64_t qb = task / (KV * head_groups), kv = task / head_groups % KV, hg = task % head_groups;
    Rows rows{0, {}, {}, {}};
    for (int64_t i = qb * Bq; i < std::min(T, (qb + 1) * Bq); ++i)
      for (int64_t g = 0; g < Gt; ++g, ++rows.count) {
        rows.index[rows.count] = i;
        rows.heads[rows.count] = kv * G + hg * Gt + g;
        rows.positions[rows.count] = start + i;
      }
    attend_rows(rows, qp, q.stride(0), kt + kv * D * Lp, v + kv * Lp * D, Lp, D, H, (float)scale, op);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor blocks, int start, int block_size, "
        "float scale) -> Tensor");
  m.impl("prefill_attention", torch::kCPU, &prefill_attention);
}
#endif
