// Fused elementwise ops for CPU decode steps.
//
// Why: at batch 1 a SmolLM2 layer's non-GEMV work is ~20 tiny torch ops, and each costs more in
// dispatch (5-60 us) than in arithmetic; these replace them with one call each. Built with
// -ffp-contract=off and written in HF's operation order, so the elementwise results round like
// torch's; only the RMS reduction order differs (a last-bit difference in the variance).
#include "kernels.h"
#include "vector_exp.h"
#include <ATen/Parallel.h>

#include <cmath>

namespace {

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1, name, ": float32 [T, N] rows");
}

// out = weight * (x * rsqrt(mean(x^2) + eps)), HF's LlamaRMSNorm order.
void rms_norm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / (float)n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// One head x [D] rotated: x * cos + roll(x, D/2) * signed_sin, rounded to T (a half cache) at the end.
template <class T>
void rotate_head(const float* x, const float* c, const float* s, T* out, int64_t d) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = static_cast<T>(x[i] * c[i] + x[i + half] * s[i]);
#pragma omp simd
  for (int64_t i = half; i < d; ++i) out[i] = static_cast<T>(x[i] * c[i] + x[i - half] * s[i]);
}

// rotary_to_cache for a cache of element type T.
template <class T>
torch::Tensor rotary_to_cache_as(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                                 torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                 int64_t heads) {
  const int64_t t = qkv.size(0), kv = k_cache.size(1), d = k_cache.size(2), stride = qkv.stride(0);
  auto q = torch::empty({t, heads, d}, qkv.options());
  const float *xp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = signed_sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  float* qp = q.data_ptr<float>();
  T *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  at::parallel_for(0, t, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float *x = xp + r * stride, *c = cp + r * d, *s = sp + r * d;
      for (int64_t h = 0; h < heads; ++h) rotate_head(x + h * d, c, s, qp + (r * heads + h) * d, d);
      for (int64_t h = 0; h < kv; ++h) {
        rotate_head(x + (heads + h) * d, c, s, kp + (slot[r] * kv + h) * d, d);
        for (int64_t i = 0; i < d; ++i) vp[(slot[r] * kv + h) * d + i] = static_cast<T>(x[(heads + kv + h) * d + i]);
      }
    }
  });
  return q;
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  const int64_t t = x.size(0), n = x.size(1), stride = x.stride(0);
  auto out = torch::empty({t, n}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) rms_norm_row(xp + r * stride, wp, op + r * n, n, (float)eps);
  });
  return out;
}

// Residual add then norm (vLLM's fused_add_rms_norm, out of place): -> (h + delta, rms_norm(h + delta)).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& h, const torch::Tensor& delta,
                                                      const torch::Tensor& weight, double eps) {
  check_rows(h, "add_rms_norm");
  check_rows(delta, "add_rms_norm");
  const int64_t t = h.size(0), n = h.size(1);
  auto sum = torch::empty({t, n}, h.options()), out = torch::empty({t, n}, h.options());
  const float *hp = h.data_ptr<float>(), *dp = delta.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  const int64_t hs = h.stride(0), ds = delta.stride(0);
  at::parallel_for(0, t, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* s = sp + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) s[i] = hp[r * hs + i] + dp[r * ds + i];
      rms_norm_row(s, wp, op + r * n, n, (float)eps);
    }
  });
  return {sum, out};
}

// gate_up [T, 2I] (gate | up) -> silu(gate) * up [T, I]: g / (1 + exp(-g)) * u, with e = exp(-|g|) so that
// nothing overflows (g / (1 + e) for g >= 0, g e / (1 + e) below); 16 or 8 at a time on AVX-512 or AVX2.
torch::Tensor silu_and_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "silu_and_mul");
  const int64_t t = gate_up.size(0), n = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = torch::empty({t, n}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, 4, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float *g = gp + r * stride, *u = g + n;
      float* o = op + r * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 ex = sedac_exp::exp_nonpositive(-_mm512_abs_ps(x));
        const __m512 num = _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x, ex);
        _mm512_storeu_ps(o + i, (num / (ex + 1.f)) * _mm512_loadu_ps(u + i));
      }
#elif defined(__AVX2__)
      for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i), zero = _mm256_setzero_ps();
        const __m256 ex = sedac_exp::exp_nonpositive(_mm256_sub_ps(zero, _mm256_max_ps(x, _mm256_sub_ps(zero, x))));
        const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, ex), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
        _mm256_storeu_ps(o + i, (num / (ex + 1.f)) * _mm256_loadu_ps(u + i));
      }
#endif
      for (; i < n; ++i) {
        const float ex = sedac_exp::exp_nonpositive(-std::abs(g[i]));
        o[i] = ((g[i] < 0.f ? g[i] * ex : g[i]) / (ex + 1.f)) * u[i];
      }
    }
  });
  return out;
}

// Rotary embedding, HF's q * cos + rotate_half(q) * sin as x * cos + roll(x, D/2) * signed_sin:
// x [T, N, D] (rows may be strided), cos and signed_sin [T, 1, D] -> [T, N, D].
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& signed_sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "rotary: float32 [T, N, D] with contiguous heads");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.numel() == x.size(0) * x.size(2),
              "rotary: tables [T, 1, D]");
  const int64_t t = x.size(0), heads = x.size(1), d = x.size(2), stride = x.stride(0);
  auto out = torch::empty({t, heads, d}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = signed_sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t h = 0; h < heads; ++h)
        rotate_head(xp + r * stride + h * d, cp + r * d, sp + r * d, op + (r * heads + h) * d, d);
  });
  return out;
}

// A decode step's projection qkv [T, (H + 2 KV) * D] -> rotated q [T, H, D], with rotated K and V
// written straight into the caches [slots, KV, D] at slots [T] (rounded once to a half cache's dtype):
// rotary plus two index_copy_ calls, without their dispatch and temporaries.
torch::Tensor rotary_to_cache(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                              torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                              int64_t num_heads) {
  const int64_t kv = k_cache.size(1), d = k_cache.size(2);
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 2 && qkv.stride(1) == 1 &&
              qkv.size(1) == (num_heads + 2 * kv) * d, "rotary_to_cache: float32 qkv [T, (H + 2 KV) * D]");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.numel() == qkv.size(0) * d &&
              k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
              slots.scalar_type() == at::kLong && slots.numel() == qkv.size(0),
              "rotary_to_cache: tables [T, 1, D], contiguous caches [slots, KV, D], int64 slots [T]");
  switch (k_cache.scalar_type()) {
    case at::kFloat: return rotary_to_cache_as<float>(qkv, cos, signed_sin, k_cache, v_cache, slots, num_heads);
    case at::kHalf: return rotary_to_cache_as<at::Half>(qkv, cos, signed_sin, k_cache, v_cache, slots, num_heads);
    case at::kBFloat16:
      return rotary_to_cache_as<at::BFloat16>(qkv, cos, signed_sin, k_cache, v_cache, slots, num_heads);
    default: TORCH_CHECK(false, "rotary_to_cache: float32, float16 or bfloat16 caches, got ", k_cache.scalar_type());
  }
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
  m.impl("rotary", torch::kCPU, &rotary);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor h, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.impl("rms_norm", torch::kCPU, &rms_norm);
  m.impl("add_rms_norm", torch::kCPU, &add_rms_norm);
  m.impl("silu_and_mul", torch::kCPU, &silu_and_mul);
}
