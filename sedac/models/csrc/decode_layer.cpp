// Decoder layers for a CPU decode step (every row one new token), in a single call.
//
// Why: at batch 1 the layer's arithmetic is four weight GEMVs that run at memory bandwidth; what
// was left on top was Python: ~25 op dispatches and module calls per layer, ~0.3 ms, a fifth of the
// token time over 30 layers. This is the same sequence of ops as DecoderLayer.forward with the CPU
// kernels (so the result is bit-identical to it), dispatched from C++.
#include "kernels.h"

namespace {

// y += x for two dense fp32 [B, N] tensors: a loop, where torch's add cost ~3 us of dispatch a layer.
void add_rows(torch::Tensor& y, const torch::Tensor& x) {
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
#pragma omp simd
  for (int64_t i = 0; i < y.numel(); ++i) yp[i] += xp[i];
}

// The layer, with `linear(x, i)` applying projection i (0 qkv with its bias, 1 o, 2 gate_up, 3 down).
// h [B, hidden]; cos, signed_sin [B, 1, D]; caches [slots, KV, D]; slots [B] where this step's K/V go;
// tables [B, nb], lengths [B] as in paged_decode_attention -> [B, hidden].
template <class Linear>
torch::Tensor layer(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                    const torch::Tensor& input_norm, const torch::Tensor& post_norm, double eps, Linear&& linear,
                    torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                    const torch::Tensor& tables, const torch::Tensor& lengths, int64_t num_heads, int64_t block_size) {
  const int64_t b = h.size(0), d = k_cache.size(2);
  auto qkv = linear(rms_norm(h, input_norm, eps), 0);                                      // [B, (H + 2KV) * D]
  auto q = rotary_to_cache(qkv, cos, signed_sin, k_cache, v_cache, slots, num_heads);         // [B, H, D]
  auto attn = paged_decode_attention(q, k_cache, v_cache, tables, lengths, block_size,
                                     std::pow((double)d, -0.5));                                // [B, H, D], Python's d ** -0.5
  auto [residual, normed] = add_rms_norm(h, linear(attn.view({b, num_heads * d}), 1), post_norm, eps);
  auto out = linear(silu_and_mul(linear(normed, 2)), 3);   // fresh [B, hidden]: the residual joins in place
  add_rows(out, residual);
  return out;
}

}  // namespace

// One projection on whatever the runner packed: fp32/fp16/bf16 panels (no scale), int8 panels with
// one fp32 scale per output (a 1-D scale: int8 engines, lossless mode's drafter; int8_linear_a8's
// offset codes for int8 engines on VNNI), or block panels
// (fp16 scales per group: int4 and gguf engines; int4's 4-bit ones in block_linear_a8's layout). The
// integer kernels quantize activations to `levels` int8 levels (int8_activations.h).
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& panels, const std::optional<torch::Tensor>& scale,
                            const std::optional<torch::Tensor>& min, const std::optional<torch::Tensor>& bias,
                            int64_t out_features, int64_t levels) {
  if (!scale) return panel_linear(x, panels, bias, out_features);
  if (panels.size(2) == 64)   // int8 activations (VNNI): 4-bit codes with minimums, or offset 8-bit ones
    return min ? block_linear_a8(x, panels, *scale, *min, bias, out_features, levels)
               : int8_linear_a8(x, panels, *scale, bias, out_features, levels);
  if (scale->dim() == 1) return int8_panel_linear(x, panels, *scale, bias, out_features);
  return block_linear(x, panels, *scale, min, bias, out_features);
}

// Consecutive decoder layers of a CPU decode step in one call: layer l's weights are panels[4l..4l+3]
// (scales, mins alike, out_features the same for every layer), its norms input_norms[l] and
// post_norms[l], its caches k_caches[l] and v_caches[l]. One call per step instead of one per layer
// saves the argument conversion and dispatch of the other 29 (~10 us each on SmolLM2). activation_levels:
// the integer kernels' (2, or 1 for w4a8 and w8a8 engines).
torch::Tensor decode_layers(const torch::Tensor& h_in, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                            at::TensorList input_norms, at::TensorList post_norms, double eps, at::TensorList panels,
                            const c10::List<std::optional<torch::Tensor>>& scales,
                            const c10::List<std::optional<torch::Tensor>>& mins, at::IntArrayRef out_features,
                            const c10::List<std::optional<torch::Tensor>>& qkv_biases, at::TensorList k_caches,
                            at::TensorList v_caches, const torch::Tensor& slots, const torch::Tensor& tables,
                            const torch::Tensor& lengths, int64_t num_heads, int64_t block_size,
                            int64_t activation_levels) {
  const size_t layers = input_norms.size();
  TORCH_CHECK(post_norms.size() == layers && panels.size() == 4 * layers && scales.size() == 4 * layers &&
              mins.size() == 4 * layers && out_features.size() == 4 && qkv_biases.size() == layers &&
              k_caches.size() == layers && v_caches.size() == layers,
              "decode_layers: per layer one input norm, post norm, qkv bias (or None), K and V cache, and four "
              "projections");
  auto h = h_in;
  for (size_t l = 0; l < layers; ++l) {
    auto linear = [&](const torch::Tensor& x, int i) {
      const size_t at = 4 * l + i;
      return packed_linear(x, panels[at], scales.get(at), mins.get(at), i == 0 ? qkv_biases.get(l) : std::nullopt,
                           out_features[i], activation_levels);
    };
    auto k_cache = k_caches[l], v_cache = v_caches[l];
    h = layer(h, cos, signed_sin, input_norms[l], post_norms[l], eps, linear, k_cache, v_cache, slots, tables,
              lengths, num_heads, block_size);
  }
  return h;
}

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.def("decode_layers(Tensor h, Tensor cos, Tensor signed_sin, Tensor[] input_norms, Tensor[] post_norms, "
        "float eps, Tensor[] panels, Tensor?[] scales, Tensor?[] mins, int[] out_features, Tensor?[] qkv_biases, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor slots, Tensor tables, Tensor lengths, int num_heads, "
        "int block_size, int activation_levels=2) -> Tensor");
  m.impl("decode_layers", torch::kCPU, &decode_layers);
}
