// Weight-only int8 panels (int8 engines: one scale per output; 8-bit blocks, GGUF Q8_0's scheme: one per
// output and group of 32 inputs, int4 engines' LM head) against activations quantized to two int8 levels
// per group of 32 inputs, or one (w8a8 engines, a w4a8 engine's head) (int8_activations.h): integer dot
// products on AVX-512 VNNI.
//
// Why: int8_panel_linear widens every weight to fp32 (three ops per 16 weights before its FMA), so at
// batch 1 an int8 engine was compute-bound: SmolLM2's 30 layers at ~21 GB/s against fp32's ~30. One
// vpdpbusd multiplies 64 weights by 64 int8 activations, two per 64 weights for the two levels.
// vpdpbusd takes unsigned bytes on one side, so the weights are stored offset, u = w + 128, and
// per output and group sum(u (254 c + f)) - 128 sum(254 c + f) = sum(w (254 c + f)), exact in int32.
// Per output: y = scale * sum over groups of float(that integer) * step, groups in order, or with group
// scales y = sum of float(that integer) * (d * step), so a row's result is the same alone or in any batch.
// (The 8-bit head of an int4 engine at 16 rows: the exact block kernel widens every code to fp32.)
// Layout (sedac.models.quant.int8_a8_panels): codes [P, in / 4, 64] uint8, byte 4j + t of row i holding
// weight (output 16p + j, input 4i + t) + 128; group scales [P, in / 32, 16] fp16 as in block_linear.cpp.
#include "int8_activations.h"
#include "kernels.h"
#include "panel_schedule.h"

namespace {

using namespace sedac_panels;
using namespace sedac_a8;

constexpr int64_t kActivationGroup = 32;

template <int Levels>   // activation levels: 2, or 1 without the fine dot products
struct Int8A8Kernel {
  const uint8_t* codes;
  const at::Half* group_scales;   // [P, n / 32, 16], or nullptr: one scale per output, applied after
  const float* x;                 // the fp32 rows the schedule hands out (to find a tile's row index)
  const QuantizedRows* rows;
  int64_t n;
  int64_t code_stride() const { return n / 4 * 64; }
  int64_t scale_stride() const { return n / kActivationGroup * kPanel; }

  bool run_group(int64_t, int64_t, const float*, int64_t, float*, int64_t) const { return false; }

  template <int R, int P>
  void tile(int64_t panel, const float* xr, int64_t, float* y, int64_t ldy) const {
    const int64_t row = (xr - x) / n, groups = n / kActivationGroup;
    const int8_t *xc = rows->coarse.data() + row * n, *xf = rows->fine.data() + row * n;
    const float* dx = rows->step.data() + row * groups;
    const int32_t* levels = rows->levels.data() + row * groups;
    const uint8_t* c = codes + panel * code_stride();
    const at::Half* s = group_scales ? group_scales + panel * scale_stride() : nullptr;
#if SEDAC_VNNI
    __m512 out[R * P];
#pragma GCC unroll 16
    for (int a = 0; a < R * P; ++a) out[a] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i coarse[R * P], fine[R * P];
#pragma GCC unroll 16
      for (int a = 0; a < R * P; ++a) coarse[a] = fine[a] = _mm512_setzero_si512();
      for (int64_t k = g * kActivationGroup; k < (g + 1) * kActivationGroup; k += 4) {
        __m512i ca[R], fa[R];   // four activations per 32-bit lane
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          ca[r] = broadcast4(xc + r * n + k);
          if constexpr (Levels == 2) fa[r] = broadcast4(xf + r * n + k);
        }
        if constexpr (P == kGroup) prefetch_l2(c + kGroup * code_stride() + k / 4 * 64 * kGroup, 64 * kGroup);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          if constexpr (P != kGroup) _mm_prefetch(reinterpret_cast<const char*>(c + p * code_stride() + k / 4 * 64 + kAhead), _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(c + p * code_stride() + k / 4 * 64);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            coarse[r * P + p] = _mm512_dpbusd_epi32(coarse[r * P + p], v, ca[r]);
            if constexpr (Levels == 2) fine[r * P + p] = _mm512_dpbusd_epi32(fine[r * P + p], v, fa[r]);
          }
        }
      }
      if constexpr (P == kGroup)   // the next task's scales too, fp16: 2 bytes each
        if (s) prefetch_l2(s + kGroup * scale_stride() + g * kPanel * kGroup, 2 * kPanel * kGroup);
      __m512 d[P];   // the group's scales (1 without: d * step is then step exactly)
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p)
        d[p] = s ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + p * scale_stride() + g * kPanel)))
                 : _mm512_set1_ps(1.f);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i offset = _mm512_set1_epi32(128 * levels[r * groups + g]);
        const __m512 step = _mm512_set1_ps(dx[r * groups + g]);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const __m512i scaled = _mm512_mullo_epi32(coarse[r * P + p], _mm512_set1_epi32(kFine));
          const __m512i sum = _mm512_sub_epi32(_mm512_add_epi32(scaled, fine[r * P + p]), offset);
          out[r * P + p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d[p], step), out[r * P + p]);
        }
      }
    }
    store_tile<R, P>(out, y, ldy);
#else   // the same integer sums and float steps, one output at a time
    scalar_tile<R, P>(y, ldy, groups, [&](int r, int p, int j, int64_t g, float out) {
      const auto weight = [&](int64_t k) { return c[p * code_stride() + k / 4 * 64 + 4 * j + k % 4] - 128; };
      const int32_t sum = group_dot(weight, xc + r * n, xf + r * n, g * kActivationGroup, kActivationGroup);
      const float d = s ? static_cast<float>(s[p * scale_stride() + g * kPanel + j]) : 1.f;
      return std::fma(static_cast<float>(sum), d * dx[r * groups + g], out);
    });
#endif
  }
};

}  // namespace

// x [T, in] fp32 against offset int8 panels in the layout above, scale [out] fp32 or group scales
// [P, in / 32, 16] fp16 -> [T, out] (+ bias).
torch::Tensor int8_linear_a8(const torch::Tensor& x_in, const torch::Tensor& codes, const torch::Tensor& scale,
                             const std::optional<torch::Tensor>& bias, int64_t out_features, int64_t levels) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "int8_linear_a8: x float32 [T, in]");
  const auto x = x_in.contiguous();
  const int64_t t = x.size(0), n = x.size(1), num_panels = codes.size(0);
  TORCH_CHECK(n % kActivationGroup == 0, "int8_linear_a8: inputs a multiple of ", kActivationGroup);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.size(2) == 64 && codes.is_contiguous() &&
              codes.size(1) * 4 == n && num_panels * kPanel >= out_features,
              "int8_linear_a8: codes uint8 [ceil(out / 16), in / 4, 64] matching x");
  const bool grouped = scale.dim() == 3;
  TORCH_CHECK(grouped ? scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.size(0) == num_panels &&
                            scale.size(1) * kActivationGroup == n && scale.size(2) == kPanel
                      : scale.scalar_type() == at::kFloat && scale.numel() == out_features,
              "int8_linear_a8: scale float32 [out], or fp16 [panels, in / 32, 16] per group of 32 inputs");
  const QuantizedRows& rows = quantize_rows(x.data_ptr<float>(), t, n, kActivationGroup, levels);
  const auto run = [&](auto kernel) {
    kernel = {codes.data_ptr<uint8_t>(), grouped ? scale.data_ptr<at::Half>() : nullptr, x.data_ptr<float>(), &rows, n};
    return run_panels(kernel, x, num_panels, out_features);
  };
  auto y = levels == 2 ? run(Int8A8Kernel<2>{}) : run(Int8A8Kernel<1>{});
  if (!grouped) y.mul_(scale);
  if (bias) y.add_(*bias);
  return y;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("int8_linear_a8(Tensor x, Tensor codes, Tensor scale, Tensor? bias, int out_features, int levels=2) -> Tensor");
  m.impl("int8_linear_a8", torch::kCPU, &int8_linear_a8);
}
