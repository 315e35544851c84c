// One decoder layer for a CPU decode step (every row one new token), in a single call.
//
// Why: at batch 1 the layer's arithmetic is four weight GEMVs that run at memory bandwidth; what
// was left on top was Python: ~25 op dispatches and module calls per layer, ~0.3 ms, a fifth of the
// token time over 30 layers. This is the same sequence of ops as DecoderLayer.forward with the CPU
// kernels (so the result is bit-identical to it), dispatched from C++.
#include "kernels.h"

namespace {

// The layer, with `linear(x, i)` applying projection i (0 qkv with its bias, 1 o, 2 gate_up, 3 down).
// h [B, hidden]; cos, signed_sin [B, 1, D]; caches [slots, KV, D]; slots [B] where this step's K/V go;
// tables [B, nb], lengths [B] as in paged_decode_attention -> [B, hidden].
template <class Linear>
torch::Tensor layer(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                    const torch::Tensor& input_norm, const torch::Tensor& post_norm, double eps, Linear&& linear,
                    torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                    const torch::Tensor& tables, const torch::Tensor& lengths, int64_t num_heads, int64_t block_size) {
  const int64_t b = h.size(0), kv = k_cache.size(1), d = k_cache.size(2);
  auto qkv = linear(rms_norm(h, input_norm, eps), 0);                                      // [B, (H + 2KV) * D]
  auto q_and_k = rotary(qkv.narrow(1, 0, (num_heads + kv) * d).view({b, num_heads + kv, d}), cos, signed_sin);
  k_cache.index_copy_(0, slots, q_and_k.narrow(1, num_heads, kv).to(k_cache.scalar_type()));   // a half pool rounds here
  v_cache.index_copy_(0, slots, qkv.narrow(1, (num_heads + kv) * d, kv * d).view({b, kv, d}).to(v_cache.scalar_type()));
  auto attn = paged_decode_attention(q_and_k.narrow(1, 0, num_heads), k_cache, v_cache, tables, lengths,
                                     block_size, std::pow((double)d, -0.5));                  // [B, H, D], Python's d ** -0.5
  auto [residual, normed] = add_rms_norm(h, linear(attn.view({b, num_heads * d}), 1), post_norm, eps);
  return residual + linear(silu_and_mul(linear(normed, 2)), 3);
}

}  // namespace

// One projection on whatever the runner packed: fp32/fp16/bf16 panels (no scale), int8 panels with
// one fp32 scale per output (a 1-D scale: int8 engines, lossless mode's drafter), or block panels
// (fp16 scales per group: int4 and gguf engines; int4's 4-bit ones in block_linear_a8's layout).
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& panels, const std::optional<torch::Tensor>& scale,
                            const std::optional<torch::Tensor>& min, const std::optional<torch::Tensor>& bias,
                            int64_t out_features) {
  if (!scale) return panel_linear(x, panels, bias, out_features);
  if (scale->dim() == 1) return int8_panel_linear(x, panels, *scale, bias, out_features);
  if (panels.size(2) == 64) return block_linear_a8(x, panels, *scale, *min, bias, out_features);   // int8 activations
  return block_linear(x, panels, *scale, min, bias, out_features);
}

// panels, scales, mins: the four projections [qkv, o, gate_up, down] as packed_linear takes them.
torch::Tensor decode_layer(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                           const torch::Tensor& input_norm, const torch::Tensor& post_norm, double eps,
                           at::TensorList panels, const c10::List<std::optional<torch::Tensor>>& scales,
                           const c10::List<std::optional<torch::Tensor>>& mins, at::IntArrayRef out_features,
                           const std::optional<torch::Tensor>& qkv_bias, torch::Tensor k_cache, torch::Tensor v_cache,
                           const torch::Tensor& slots, const torch::Tensor& tables, const torch::Tensor& lengths,
                           int64_t num_heads, int64_t block_size) {
  TORCH_CHECK(panels.size() == 4 && scales.size() == 4 && mins.size() == 4 && out_features.size() == 4,
              "decode_layer: four projections");
  auto linear = [&](const torch::Tensor& x, int i) {
    return packed_linear(x, panels[i], scales.get(i), mins.get(i), i == 0 ? qkv_bias : std::nullopt, out_features[i]);
  };
  return layer(h, cos, signed_sin, input_norm, post_norm, eps, linear, k_cache, v_cache, slots, tables, lengths,
               num_heads, block_size);
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("decode_layer(Tensor h, Tensor cos, Tensor signed_sin, Tensor input_norm, Tensor post_norm, float eps, "
        "Tensor[] panels, Tensor?[] scales, Tensor?[] mins, int[] out_features, Tensor? qkv_bias, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor tables, Tensor lengths, int num_heads, "
        "int block_size) -> Tensor");
  m.impl("decode_layer", torch::kCPU, &decode_layer);
}
