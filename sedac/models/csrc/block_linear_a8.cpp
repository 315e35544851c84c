// 4-bit block panels against activations quantized to int8 per group (int4 engines): integer dot
// products like llama.cpp's Q4_1 x Q8_1 kernels, on AVX-512 VNNI.
//
// Why: the exact block kernel (block_linear.cpp) converts every weight to fp32 and spends ~9 vector
// ops per 32 weights, so at batch 1 it is compute-bound at ~int8's speed (SmolLM2's 30 layers' GEMVs
// 4.4 ms for 66 MB). One vpdpbusd multiplies 64 codes by 64 int8 activations; with the nibble
// unpacking that is ~8 ops per 128 weights for two activation levels.
// Activations in two int8 levels per group, or one (w4a8 engines) (int8_activations.h).
// Per output and group: y += float(254 sum(q c) + sum(q f)) * (d * s / 254), then y += m * sum(x), in
// that order (the integer is exact, below 2^24 for groups of 32), and a row's result is the same alone
// or in any batch.
// Layout (sedac.models.quant.BlockWeight.panels(int8_activations=True)): codes [P, in / 8, 64] uint8,
// byte 4j + t of row i holding input 8i + t (low nibble) and 8i + 4 + t (high) of output 16p + j;
// scales and minimums [P, in / group, 16] fp16 as in block_linear.cpp.
#include "int8_activations.h"
#include "kernels.h"
#include "panel_schedule.h"

namespace {

using namespace sedac_panels;
using namespace sedac_a8;

template <int Levels>   // activation levels: 2, or 1 without the fine dot products
struct A8Kernel {
  const uint8_t* codes;
  const at::Half *scales, *mins;
  const float* x;             // the fp32 rows the schedule hands out (to find a tile's row index)
  const QuantizedRows* rows;
  int64_t n, group;
  int64_t code_stride() const { return n / 8 * 64; }
  int64_t scale_stride() const { return n / group * kPanel; }

  bool run_group(int64_t, int64_t, const float*, int64_t, float*, int64_t) const { return false; }

  template <int R, int P>
  void tile(int64_t panel, const float* xr, int64_t, float* y, int64_t ldy) const {
    const int64_t row = (xr - x) / n, groups = n / group;
    const int8_t *xc = rows->coarse.data() + row * n, *xf = rows->fine.data() + row * n;
    const float *dx = rows->step.data() + row * groups, *sx = rows->sum.data() + row * groups;
    const uint8_t* c = codes + panel * code_stride();
    const at::Half *s = scales + panel * scale_stride(), *mn = mins + panel * scale_stride();
#if SEDAC_VNNI
    __m512 out[R * P];
#pragma GCC unroll 16
    for (int a = 0; a < R * P; ++a) out[a] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(15);
    for (int64_t g = 0; g < groups; ++g) {
      __m512i coarse[R * P], fine[R * P];
#pragma GCC unroll 16
      for (int a = 0; a < R * P; ++a) coarse[a] = fine[a] = _mm512_setzero_si512();
      for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
        __m512i ca[R], cb[R], fa[R], fb[R];     // four activations per 32-bit lane, for inputs k.. and k + 4..
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          ca[r] = broadcast4(xc + r * n + k);
          cb[r] = broadcast4(xc + r * n + k + 4);
          if constexpr (Levels == 2) {
            fa[r] = broadcast4(xf + r * n + k);
            fb[r] = broadcast4(xf + r * n + k + 4);
          }
        }
        if constexpr (P == kGroup) prefetch_l2(c + kGroup * code_stride() + k / 8 * 64 * kGroup, 64 * kGroup);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          if constexpr (P != kGroup)
            _mm_prefetch(reinterpret_cast<const char*>(c + p * code_stride() + k / 8 * 64 + kAhead), _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(c + p * code_stride() + k / 8 * 64);
          const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            coarse[r * P + p] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(coarse[r * P + p], lo, ca[r]), hi, cb[r]);
            if constexpr (Levels == 2)
              fine[r * P + p] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(fine[r * P + p], lo, fa[r]), hi, fb[r]);
          }
        }
      }
      if constexpr (P == kGroup) {
        prefetch_l2(s + kGroup * scale_stride() + g * kPanel * kGroup, 2 * kPanel * kGroup);   // fp16: 2 bytes
        prefetch_l2(mn + kGroup * scale_stride() + g * kPanel * kGroup, 2 * kPanel * kGroup);
      }
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        _mm_prefetch(reinterpret_cast<const char*>(s + p * scale_stride() + (g + 4) * kPanel), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(mn + p * scale_stride() + (g + 4) * kPanel), _MM_HINT_T0);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + p * scale_stride() + g * kPanel)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + p * scale_stride() + g * kPanel)));
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {   // 254 * coarse + fine: exact in int32 and in fp32 (< 2^24)
          const __m512i sum = _mm512_add_epi32(_mm512_mullo_epi32(coarse[r * P + p], _mm512_set1_epi32(kFine)), fine[r * P + p]);
          const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[r * groups + g]));
          out[r * P + p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, out[r * P + p]);
          out[r * P + p] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * groups + g]), out[r * P + p]);
        }
      }
    }
    store_tile<R, P>(out, y, ldy);
#else   // the same integer sums and float steps, one output at a time
    scalar_tile<R, P>(y, ldy, groups, [&](int r, int p, int j, int64_t g, float out) {
      const auto code = [&](int64_t k) {
        const uint8_t byte = c[p * code_stride() + k / 8 * 64 + 4 * j + k % 4];
        return (k % 8) < 4 ? byte & 15 : byte >> 4;
      };
      const int32_t sum = group_dot(code, xc + r * n, xf + r * n, g * group, group);
      const float d = static_cast<float>(s[p * scale_stride() + g * kPanel + j]);
      const float m = static_cast<float>(mn[p * scale_stride() + g * kPanel + j]);
      return std::fma(m, sx[r * groups + g], std::fma(static_cast<float>(sum), d * dx[r * groups + g], out));
    });
#endif
  }
};

}  // namespace

// x [T, in] fp32 against 4-bit block panels in the layout above -> [T, out] (+ bias).
torch::Tensor block_linear_a8(const torch::Tensor& x_in, const torch::Tensor& codes, const torch::Tensor& scales,
                              const torch::Tensor& mins, const std::optional<torch::Tensor>& bias, int64_t out_features,
                              int64_t levels) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "block_linear_a8: x float32 [T, in]");
  const auto x = x_in.contiguous();
  const int64_t t = x.size(0), n = x.size(1), num_panels = codes.size(0);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == 64 && codes.is_contiguous() &&
              codes.size(1) * 8 == n && num_panels * kPanel >= out_features,
              "block_linear_a8: codes uint8 [ceil(out / 16), in / 8, 64] matching x");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.is_contiguous() &&
              scales.size(0) == num_panels && scales.size(2) == kPanel && scales.size(1) > 0 &&
              n % scales.size(1) == 0 && (n / scales.size(1)) % 8 == 0 && mins.sizes() == scales.sizes() &&
              mins.scalar_type() == at::kHalf && mins.is_contiguous(),
              "block_linear_a8: scales and minimums fp16 [panels, groups, 16], groups of a multiple of 8 inputs");
  const int64_t group = n / scales.size(1);
  const QuantizedRows& rows = quantize_rows(x.data_ptr<float>(), t, n, group, levels);
  const auto run = [&](auto kernel) {
    kernel = {codes.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), mins.data_ptr<at::Half>(), x.data_ptr<float>(),
              &rows, n, group};
    return run_panels(kernel, x, num_panels, out_features);
  };
  auto y = levels == 2 ? run(A8Kernel<2>{}) : run(A8Kernel<1>{});
  if (bias) y.add_(*bias);
  return y;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("block_linear_a8(Tensor x, Tensor codes, Tensor scales, Tensor mins, Tensor? bias, int out_features, "
        "int levels=2) -> Tensor");
  m.impl("block_linear_a8", torch::kCPU, &block_linear_a8);
}
