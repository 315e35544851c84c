// Linear layers on panel-packed weights, fp32, fp16, bf16 or weight-only int8: every CPU step runs on
// them (decode, verify, prefill at every precision; lossless mode's int8 draft passes and int8 exits).
//
// Why: a batch-1 decode streams every weight once per token. oneDNN's prepacked GEMV reached ~17 GB/s
// on SmolLM2's layer shapes on 2 AVX2 cores; this kernel ~29 GB/s (30 layers' GEMVs 14.6 vs 20.5 ms),
// and it stays ahead as rows grow (32 rows 63 vs 66 ms, 256 rows 347 vs 376 ms).
// Layout: panels [ceil(out / 16), in, 16], panel p holding outputs 16p..16p+15 interleaved by input
// index, so a tile streams each panel front to back (Linear.pack_for_cpu packs it). A tile keeps
// R rows x P panels x 2 AVX registers of accumulators (R * P = 6: 12 of the 16 registers).
// Each output is one FMA chain over the inputs in order, whatever the tile, the rows or the thread
// split: a row's result is bitwise the same alone or in any batch.
// int8 panels (lossless mode's drafter, a quarter of the bytes) keep the activations fp32 and scale
// each output by its row's scale after the chain: quantizing activations too (fbgemm's dynamic int8)
// cost SmolLM2 40 points of draft agreement, its hidden states have outlier channels.
#include "kernels.h"
#include "panel_schedule.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using namespace sedac_panels;

#if defined(__AVX512F__)
// The 16 weights of panel row k as one register of 16 floats: half the conversions of AVX2's two,
// which is what bounds the narrow formats (int8 at 17 GB/s on AVX2 vs fp32's 33).
inline __m512 panel_row(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 panel_row(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
inline __m512 panel_row(const at::Half* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}
inline __m512 panel_row(const at::BFloat16* w) {   // a bfloat16 is the top half of its float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#elif defined(__AVX2__)
// The 16 weights of panel row k as two registers of 8 floats.
inline void load_panel_row(const float* w, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(w);
  hi = _mm256_loadu_ps(w + 8);
}
inline void load_panel_row(const int8_t* w, __m256& lo, __m256& hi) {   // two widening loads, no shuffle
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8))));
}
inline void load_panel_row(const at::Half* w, __m256& lo, __m256& hi) {   // F16C: exact widening
  lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8)));
}
inline __m256 bf16_to_fp32(const at::BFloat16* w) {   // a bfloat16 is the top half of its float32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline void load_panel_row(const at::BFloat16* w, __m256& lo, __m256& hi) {
  lo = bf16_to_fp32(w);
  hi = bf16_to_fp32(w + 8);
}
#endif

// The 16 weights of panel row k widened to fp32 (exactly, for every weight type) into `out`.
template <class W>
inline void widen_row(const W* w, float* out) {
#if defined(__AVX512F__)
  _mm512_storeu_ps(out, panel_row(w));
#elif defined(__AVX2__)
  __m256 lo, hi;
  load_panel_row(w, lo, hi);
  _mm256_storeu_ps(out, lo);
  _mm256_storeu_ps(out + 8, hi);
#else
  for (int64_t j = 0; j < kPanel; ++j) out[j] = static_cast<float>(w[j]);
#endif
}

// y[r][16p + j] for R rows of x (row stride ldx) and P panels (panel stride ps), inputs [0, n).
// The flat accumulator array and full unrolling keep GCC from spilling it to the stack every step;
// one panel row at a time (not all P first) leaves the 12 accumulators room for int8 conversions.
template <int R, int P, class W>
inline void tile(const W* w, int64_t ps, const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy) {
#if defined(__AVX512F__)   // the same chains, a panel row per register
  __m512 acc[R * P];
#pragma GCC unroll 16
  for (int a = 0; a < R * P; ++a) acc[a] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const __m512 row = panel_row(w + p * ps + k * kPanel);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r * P + p] = _mm512_fmadd_ps(row, _mm512_set1_ps(x[r * ldx + k]), acc[r * P + p]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(y + r * ldy + p * kPanel, acc[r * P + p]);
#elif defined(__AVX2__)
  constexpr int A = R * P * 2;
  __m256 acc[A];
#pragma GCC unroll 16
  for (int a = 0; a < A; ++a) acc[a] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      __m256 lo, hi;
      load_panel_row(w + p * ps + k * kPanel, lo, hi);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
        acc[r * 2 * P + 2 * p] = _mm256_fmadd_ps(lo, xv, acc[r * 2 * P + 2 * p]);
        acc[r * 2 * P + 2 * p + 1] = _mm256_fmadd_ps(hi, xv, acc[r * 2 * P + 2 * p + 1]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      _mm256_storeu_ps(y + r * ldy + p * kPanel, acc[r * 2 * P + 2 * p]);
      _mm256_storeu_ps(y + r * ldy + p * kPanel + 8, acc[r * 2 * P + 2 * p + 1]);
    }
#else   // the same chain per output, in scalar code
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int j = 0; j < kPanel; ++j) {
        float acc = 0.f;
        for (int64_t k = 0; k < n; ++k) acc = std::fma(static_cast<float>(w[p * ps + k * kPanel + j]), x[r * ldx + k], acc);
        y[r * ldy + p * kPanel + j] = acc;
      }
#endif
}

constexpr int64_t kWidenRows = 256;   // bf16 panels from this many rows: see DenseKernel::run_group

// The tiles over panels of weight type W (panel_schedule.h runs them).
template <class W>
struct DenseKernel {
  const W* w;
  int64_t ps, n;      // panel stride, inputs
  template <int R, int P>
  void tile(int64_t panel, const float* x, int64_t ldx, float* y, int64_t ldy) const {
    ::tile<R, P, W>(w + panel * ps, ps, x, ldx, n, y, ldy);
  }
  // Prefill-sized GEMMs on bf16 weights: the task's panels widened to fp32 once, then the fp32 tiles on them:
  // the same chains on the same (exactly widened) weights, so the same bits, without the two-instruction
  // widening of every weight again for each tile of rows (a 1,024-row GEMM ran 4-8% behind fp32 that way,
  // level after). Below kWidenRows rows, and for fp16 (one instruction), widening in the tiles is faster.
  bool run_group(int64_t first, int64_t count, const float* x, int64_t t, float* y, int64_t ldy) const {
    if (!std::is_same_v<W, at::BFloat16> || t < kWidenRows) return false;
    const float* dense = widened_panels(count, ps, [&](int64_t p, float* out) {
      for (int64_t i = 0; i < ps; i += kPanel) widen_row(w + (first + p) * ps + i, out + i);
    });
    fp32_panel_group(dense, n, count, x, t, y, ldy);
    return true;
  }
};

}  // namespace

void fp32_panel_group(const float* panels, int64_t n, int64_t count, const float* x, int64_t t, float* y, int64_t ldy) {
  panel_group(DenseKernel<float>{panels, n * kPanel, n}, 0, count, x, t, n, y, ldy);
}

namespace {

// x [T, in] fp32 against panels [P, in, 16] -> [T, out] (before any scale or bias).
template <class W>
torch::Tensor panel_matmul(const torch::Tensor& x_in, const torch::Tensor& panels, int64_t out_features) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "panel_linear: x float32 [T, in]");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.is_contiguous() &&
              panels.size(1) == x_in.size(1) && panels.size(0) * kPanel >= out_features,
              "panel_linear: panels [ceil(out / 16), in, 16] matching x");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(1);
  return run_panels(DenseKernel<W>{panels.data_ptr<W>(), n * kPanel, n}, x, panels.size(0), out_features);
}

}  // namespace

// x [T, in] fp32, panels [ceil(out / 16), in, 16] fp32, fp16 or bf16, bias [out] or none -> [T, out].
// Half-precision panels are widened in registers (exactly) and accumulate in fp32: the result is the
// fp32 kernel's on the widened weights, streaming half the bytes.
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, const std::optional<torch::Tensor>& bias,
                           int64_t out_features) {
  torch::Tensor y;
  switch (panels.scalar_type()) {
    case at::kFloat: y = panel_matmul<float>(x, panels, out_features); break;
    case at::kHalf: y = panel_matmul<at::Half>(x, panels, out_features); break;
    case at::kBFloat16: y = panel_matmul<at::BFloat16>(x, panels, out_features); break;
    default: TORCH_CHECK(false, "panel_linear: float32, float16 or bfloat16 panels, got ", panels.scalar_type());
  }
  if (bias) y.add_(*bias);
  return y;
}

// The same on int8 panels with one scale per output: y = (x @ w.T) * scale (+ bias).
torch::Tensor int8_panel_linear(const torch::Tensor& x, const torch::Tensor& panels, const torch::Tensor& scale,
                                const std::optional<torch::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(panels.scalar_type() == at::kChar, "int8_panel_linear: int8 panels");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == out_features, "int8_panel_linear: scale float32 [out]");
  auto y = panel_matmul<int8_t>(x, panels, out_features).mul_(scale);
  if (bias) y.add_(*bias);
  return y;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("panel_linear(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor");
  m.impl("panel_linear", torch::kCPU, &panel_linear);
  m.def("int8_panel_linear(Tensor x, Tensor panels, Tensor scale, Tensor? bias, int out_features) -> Tensor");
  m.impl("int8_panel_linear", torch::kCPU, &int8_panel_linear);
}
