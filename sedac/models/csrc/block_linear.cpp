// Linear layers on block-quantized panels: 4-bit codes with an fp16 scale and minimum per group of
// inputs (int4 engines; GGUF Q4_0 and Q4_1), or 8-bit codes with an fp16 scale per group (GGUF Q8_0).
//
// Why: a batch-1 decode streams every weight once per token. 4-bit codes with a scale and a minimum per
// 32 inputs are 0.625 bytes a weight, against fp32's 4.
// Each weight is dequantized in registers as the reference does, w = fma(q, d, m) in fp32 (exact for
// GGUF blocks: a 4-bit code times an fp16 scale fits fp32's mantissa), then enters the same FMA chain
// over the inputs as panel_linear: the result is bitwise panel_linear's on the dequantized fp32
// weights, so a gguf engine computes what the fp32 engine built from the same file computes, and a
// row's result is the same alone or in any batch.
// Layout (sedac.models.quant.BlockWeight.panels): codes [P, in / 2, 16] uint8, byte k of panel p
// holding inputs 2k (low nibble) and 2k + 1 (high nibble) of outputs 16p..16p+15, or [P, in, 16]
// int8; scales and minimums [P, in / group, 16] fp16.
#include "kernels.h"
#include "panel_schedule.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using namespace sedac_panels;

constexpr int64_t kDequantizeRows = 12;   // from this many rows a task dequantizes its panels once

// 16 fp32 lanes, one panel row: one AVX-512 register, two AVX2 ones, or plain floats.
#if defined(__AVX512F__)
struct Vec {
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec halves(const at::Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static Vec int8s(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
  static void nibbles(const uint8_t* p, Vec& low, Vec& high) {   // 16 bytes -> two rows of codes
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    low = {_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)))};
    high = {_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
#elif defined(__AVX2__)
struct Vec {
  __m256 lo, hi;
  static Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static __m256 half8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Vec halves(const at::Half* p) { return {half8(p), half8(p + 8)}; }
  static __m256 int8x8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static Vec int8s(const int8_t* p) { return {int8x8(p), int8x8(p + 8)}; }
  static void nibbles(const uint8_t* p, Vec& low, Vec& high) {
    const __m256i mask = _mm256_set1_epi32(15);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    low = {_mm256_cvtepi32_ps(_mm256_and_si256(a, mask)), _mm256_cvtepi32_ps(_mm256_and_si256(b, mask))};
    high = {_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
  }
  void store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
};
inline Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
#else
struct Vec {
  float v[kPanel];
  template <class F>
  static Vec make(F f) {
    Vec r;
    for (int j = 0; j < kPanel; ++j) r.v[j] = f(j);
    return r;
  }
  static Vec zero() { return set1(0.f); }
  static Vec set1(float x) { return make([&](int) { return x; }); }
  static Vec halves(const at::Half* p) { return make([&](int j) { return static_cast<float>(p[j]); }); }
  static Vec int8s(const int8_t* p) { return make([&](int j) { return static_cast<float>(p[j]); }); }
  static void nibbles(const uint8_t* p, Vec& low, Vec& high) {
    low = make([&](int j) { return static_cast<float>(p[j] & 15); });
    high = make([&](int j) { return static_cast<float>(p[j] >> 4); });
  }
  void store(float* p) const { std::copy(v, v + kPanel, p); }
};
inline Vec fma(Vec a, Vec b, Vec c) { return Vec::make([&](int j) { return std::fma(a.v[j], b.v[j], c.v[j]); }); }
inline Vec mul(Vec a, Vec b) { return Vec::make([&](int j) { return a.v[j] * b.v[j]; }); }
#endif

// Tiles over block panels with Bits-bit codes (4: nibbles with minimums, 8: int8, symmetric).
template <int Bits>
struct BlockKernel {
  const void* codes;
  const at::Half *scales, *mins;
  int64_t n, group;
  int64_t code_stride() const { return n * kPanel * Bits / 8; }      // bytes per panel
  int64_t scale_stride() const { return n / group * kPanel; }

  template <int R, int P>
  void tile(int64_t panel, const float* x, int64_t ldx, float* y, int64_t ldy) const {
    Vec acc[R * P];
#pragma GCC unroll 16
    for (int a = 0; a < R * P; ++a) acc[a] = Vec::zero();
    const auto* c = static_cast<const uint8_t*>(codes) + panel * code_stride();
    const at::Half* s = scales + panel * scale_stride();
    for (int64_t g = 0; g < n / group; ++g) {
      Vec d[P], m[P];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        d[p] = Vec::halves(s + p * scale_stride() + g * kPanel);
        if constexpr (Bits == 4) m[p] = Vec::halves(mins + (s - scales) + p * scale_stride() + g * kPanel);
      }
      if constexpr (P == kGroup) {   // the next task's scales and minimums into L2 (prefetch_l2)
        prefetch_l2(s + kGroup * scale_stride() + g * kPanel * kGroup, 2 * kPanel * kGroup);
        if constexpr (Bits == 4) prefetch_l2(mins + (s - scales) + kGroup * scale_stride() + g * kPanel * kGroup, 2 * kPanel * kGroup);
      }
      for (int64_t k = g * group; k < (g + 1) * group; k += 8 / Bits) {
        if constexpr (P == kGroup) prefetch_l2(c + kGroup * code_stride() + k / (8 / Bits) * kPanel * kGroup, kPanel * kGroup);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const uint8_t* row = c + p * code_stride() + k * kPanel * Bits / 8;
          if constexpr (Bits == 4) {
            Vec low, high;
            Vec::nibbles(row, low, high);
            const Vec w0 = fma(low, d[p], m[p]), w1 = fma(high, d[p], m[p]);
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
              acc[r * P + p] = fma(w0, Vec::set1(x[r * ldx + k]), acc[r * P + p]);
              acc[r * P + p] = fma(w1, Vec::set1(x[r * ldx + k + 1]), acc[r * P + p]);
            }
          } else {
            const Vec w = mul(Vec::int8s(reinterpret_cast<const int8_t*>(row)), d[p]);
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) acc[r * P + p] = fma(w, Vec::set1(x[r * ldx + k]), acc[r * P + p]);
          }
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) acc[r * P + p].store(y + r * ldy + p * kPanel);
  }

  // Many rows (prefill, large batches): dequantize the task's panels once into fp32 panels, then run
  // panel_linear's tiles on them; the same weights in the same chains, so the same bits, without
  // dequantizing again per tile of rows (prefill ran 13% slower than fp32 that way).
  bool run_group(int64_t first, int64_t count, const float* x, int64_t t, float* y, int64_t ldy) const {
    if (t < kDequantizeRows) return false;
    const float* dense = widened_panels(count, n * kPanel, [&](int64_t p, float* out) { dequantize(first + p, out); });
    fp32_panel_group(dense, n, count, x, t, y, ldy);
    return true;
  }

  void dequantize(int64_t panel, float* out) const {   // one panel -> [n, 16] fp32
    const auto* c = static_cast<const uint8_t*>(codes) + panel * code_stride();
    const int64_t first_scale = panel * scale_stride();
    for (int64_t g = 0; g < n / group; ++g) {
      const Vec d = Vec::halves(scales + first_scale + g * kPanel);
      const Vec m = Bits == 4 ? Vec::halves(mins + first_scale + g * kPanel) : Vec::zero();
      for (int64_t k = g * group; k < (g + 1) * group; k += 8 / Bits) {
        const uint8_t* row = c + k * kPanel * Bits / 8;
        if constexpr (Bits == 4) {
          Vec low, high;
          Vec::nibbles(row, low, high);
          fma(low, d, m).store(out + k * kPanel);
          fma(high, d, m).store(out + (k + 1) * kPanel);
        } else {
          mul(Vec::int8s(reinterpret_cast<const int8_t*>(row)), d).store(out + k * kPanel);
        }
      }
    }
  }
};

}  // namespace

// x [T, in] fp32 against block panels (layout above) -> [T, out] (+ bias).
torch::Tensor block_linear(const torch::Tensor& x_in, const torch::Tensor& codes, const torch::Tensor& scales,
                           const std::optional<torch::Tensor>& mins, const std::optional<torch::Tensor>& bias,
                           int64_t out_features) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "block_linear: x float32 [T, in]");
  const bool nibbles = codes.scalar_type() == at::kByte;
  TORCH_CHECK(nibbles || codes.scalar_type() == at::kChar, "block_linear: uint8 (4-bit) or int8 codes");
  TORCH_CHECK(nibbles == mins.has_value(), "block_linear: 4-bit codes take minimums, 8-bit codes none");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(1), num_panels = codes.size(0);
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kPanel && codes.is_contiguous() &&
              codes.size(1) * (nibbles ? 2 : 1) == n && num_panels * kPanel >= out_features,
              "block_linear: codes [ceil(out / 16), in (/ 2 for 4-bit), 16] matching x");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.is_contiguous() &&
              scales.size(0) == num_panels && scales.size(2) == kPanel && scales.size(1) > 0 &&
              n % scales.size(1) == 0 && (n / scales.size(1)) % 2 == 0,
              "block_linear: scales fp16 [panels, groups, 16] with an even group size dividing in");
  TORCH_CHECK(!mins || (mins->sizes() == scales.sizes() && mins->scalar_type() == at::kHalf && mins->is_contiguous()),
              "block_linear: minimums shaped and typed like the scales");
  const int64_t group = n / scales.size(1);
  const at::Half* m = mins ? mins->data_ptr<at::Half>() : nullptr;
  auto y = nibbles ? run_panels(BlockKernel<4>{codes.data_ptr(), scales.data_ptr<at::Half>(), m, n, group}, x, num_panels, out_features)
                   : run_panels(BlockKernel<8>{codes.data_ptr(), scales.data_ptr<at::Half>(), m, n, group}, x, num_panels, out_features);
  if (bias) y.add_(*bias);
  return y;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("block_linear(Tensor x, Tensor codes, Tensor scales, Tensor? mins, Tensor? bias, int out_features) -> Tensor");
  m.impl("block_linear", torch::kCPU, &block_linear);
}
