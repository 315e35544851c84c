// Paged decode attention for CPU: one query token per sequence, K/V read straight from the block pool.
//
// Why: the portable path gathers each sequence's blocks into a contiguous copy and then runs SDPA,
// so every step reads the KV cache, writes a copy and reads it again. At 32 concurrent decodes the
// KV cache of SmolLM2 is as large as its weights, and that copy made attention a third of the step.
// Here K/V rows are read in place from the pool, by each query head of their group (grouped-query
// attention): no copy is made.
#include "kernels.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// q . k over one head's D dims.
inline float dot(const float* q, const float* k, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += q[d] * k[d];
  return acc;
}

// Slot of position p in a sequence whose block table is `table`.
inline int64_t slot_of(const int64_t* table, int64_t p, int64_t block_size) {
  return table[p / block_size] * block_size + p % block_size;
}

inline void softmax_inplace(float* s, int64_t len) {
  const float m = *std::max_element(s, s + len);
  float sum = 0.f;
  for (int64_t i = 0; i < len; ++i) sum += (s[i] = std::exp(s[i] - m));
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < len; ++i) s[i] *= inv;
}

}  // namespace

// q [B, H, D] (rows may be strided); k_cache, v_cache [slots, KV, D]; tables [B, nb] block ids; lengths [B] context lengths
// -> [B, H, D]. Sequence b attends to its positions [0, lengths[b]); position p lives in slot
// tables[b][p / block_size] * block_size + p % block_size.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& tables,
                                     const torch::Tensor& lengths, int64_t block_size, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "paged_decode_attention: float32 only");
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
  auto out = torch::zeros({B, H, D}, q.options());   // dense, whatever q's row stride
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / KV, row_stride = KV * D, q_stride = q.stride(0);
  // One task per (sequence, query head): at batch 1 the heads still split across threads (attention was
  // a single-threaded ~60 us per layer at 150 positions). A head's arithmetic is the same whatever the
  // split, so a row's result does not depend on the batch.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;   // [len] of one head
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, len = lp[b], kv_offset = (h / group) * D;
      const int64_t* table = tp + b * nb;
      const float* qh = qp + b * q_stride + h * D;
      scores.resize(len);
      for (int64_t l = 0; l < len; ++l)
        scores[l] = dot(qh, kp + slot_of(table, l, block_size) * row_stride + kv_offset, D) * (float)scale;
      softmax_inplace(scores.data(), len);
      float* oh = op + i * D;
      for (int64_t l = 0; l < len; ++l) {
        const float p = scores[l];
        const float* vh = vp + slot_of(table, l, block_size) * row_stride + kv_offset;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) oh[d] += p * vh[d];
      }
    }
  });
  return out;
}

TORCH_LIBRARY(sedac_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lengths, "
        "int block_size, float scale) -> Tensor");
  m.impl("paged_decode_attention", torch::kCPU, &paged_decode_attention);
}
