// Rows of a packed block weight dequantized to fp32: the embedding lookup of engines whose token table is
// block-quantized (int4 and gguf engines read their tied LM head's rows).
//
// Why: picking one row out of the panel layouts in torch (gather, unpack, offset, repeat the scales)
// was ~10 ops and 55-200 us a decode step on an int4 engine; here it is a loop over the row's bytes.
// Each weight is q * d (+ m) in fp32, rounded once as in sedac.plugins.reference.dequantize_blocks.
// Layouts (sedac.models.quant.BlockWeight.panels): [P, in / 8, 64] 4-bit codes for int8 activations
// (block_linear_a8.cpp), [P, in / 4, 64] offset 8-bit ones (int8_linear_a8.cpp), [P, in / 2, 16] 4-bit or
// [P, in, 16] int8 (block_linear.cpp); scales and minimums [P, in / group, 16] fp16.
#include "kernels.h"
#include <ATen/Parallel.h>

namespace {

constexpr int64_t kPanel = 16;

// The code of input k of lane j (output 16p + j) in panel bytes c = codes[p].
int32_t code_at(const uint8_t* c, int64_t k, int64_t j, int64_t lanes, bool four_bit) {
  if (lanes == 64) {   // four inputs per lane: int8 activations' layouts
    if (!four_bit) return int32_t(c[(k / 4) * 64 + 4 * j + k % 4]) - 128;
    const uint8_t byte = c[(k / 8) * 64 + 4 * j + k % 4];
    return (k % 8) < 4 ? byte & 15 : byte >> 4;
  }
  if (!four_bit) return int32_t(static_cast<int8_t>(c[k * kPanel + j]));
  const uint8_t byte = c[(k / 2) * kPanel + j];
  return k % 2 == 0 ? byte & 15 : byte >> 4;
}

}  // namespace

// codes, scales (and minimums for 4-bit codes) packed as above; index [R] int64 output rows -> [R, in] fp32.
torch::Tensor block_rows(const torch::Tensor& codes, const torch::Tensor& scales, const std::optional<torch::Tensor>& mins,
                         const torch::Tensor& index) {
  TORCH_CHECK(codes.dim() == 3 && codes.is_contiguous() && (codes.size(2) == 64 || codes.size(2) == kPanel) &&
              scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.is_contiguous() &&
              scales.size(0) == codes.size(0) && scales.size(2) == kPanel && index.scalar_type() == at::kLong &&
              index.dim() == 1, "block_rows: packed codes [P, rows, 16 or 64], fp16 scales [P, groups, 16], int64 index");
  const bool four_bit = mins.has_value(), a8 = codes.size(2) == 64;
  TORCH_CHECK(!four_bit || (mins->sizes() == scales.sizes() && mins->scalar_type() == at::kHalf && mins->is_contiguous()),
              "block_rows: minimums like the scales");
  const int64_t lanes = codes.size(2), n = codes.size(1) * (a8 ? (four_bit ? 8 : 4) : (four_bit ? 2 : 1));
  const int64_t groups = scales.size(1), group = n / groups, count = index.size(0);
  auto out = torch::empty({count, n}, scales.options().dtype(at::kFloat));
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const at::Half *sp = scales.data_ptr<at::Half>(), *mp = four_bit ? mins->data_ptr<at::Half>() : nullptr;
  const int64_t* ip = index.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < count; ++r)
    TORCH_CHECK(ip[r] >= 0 && ip[r] < codes.size(0) * kPanel, "block_rows: row ", ip[r], " outside the weight");
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {   // a prefill's rows across threads
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = ip[r] / kPanel, j = ip[r] % kPanel;
      const uint8_t* c = cp + p * codes.size(1) * lanes;
      for (int64_t k = 0; k < n; ++k) {
        const int64_t at = (p * groups + k / group) * kPanel + j;
        const float w = static_cast<float>(code_at(c, k, j, lanes, four_bit)) * static_cast<float>(sp[at]);
        op[r * n + k] = four_bit ? w + static_cast<float>(mp[at]) : w;
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("block_rows(Tensor codes, Tensor scales, Tensor? mins, Tensor index) -> Tensor");
  m.impl("block_rows", torch::kCPU, &block_rows);
}
