// Decoder layers for a CPU decode step (every row one new token), in a single call.
//
// Why: at batch 1 the layer's arithmetic is four weight GEMVs that run at memory bandwidth; what
// was left on top was Python: ~25 op dispatches and module calls per layer, ~0.3 ms, a fifth of the
// token time over 30 layers. This is the same sequence of ops as DecoderLayer.forward with the CPU
// kernels (so the result is bit-identical to it), dispatched from C++.
#include <torch/custom_class.h>

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

// Consecutive decoder layers of a CPU decode step in one call, their weights held here once: layer l's
// are panels[4l..4l+3] (scales, mins alike, out_features the same for every layer), its norms input_norms[l]
// and post_norms[l]. One call per step instead of one per layer saves the argument conversion and dispatch
// of the other 29 (~10 us each on SmolLM2), and holding the ~450 weight tensors here saves converting them
// from Python lists every step (~0.4 ms a token). activation_levels: the integer kernels' (2, or 1 for w4a8
// and w8a8 engines).
struct DecodeStack : torch::CustomClassHolder {
  std::vector<torch::Tensor> input_norms, post_norms, panels;
  c10::List<std::optional<torch::Tensor>> scales, mins, qkv_biases;
  std::vector<int64_t> out_features;
  double eps;
  int64_t num_heads, activation_levels;

  DecodeStack(std::vector<torch::Tensor> input_norms, std::vector<torch::Tensor> post_norms, double eps,
              std::vector<torch::Tensor> panels, c10::List<std::optional<torch::Tensor>> scales,
              c10::List<std::optional<torch::Tensor>> mins, std::vector<int64_t> out_features,
              c10::List<std::optional<torch::Tensor>> qkv_biases, int64_t num_heads, int64_t activation_levels)
      : input_norms(std::move(input_norms)), post_norms(std::move(post_norms)), panels(std::move(panels)),
        scales(std::move(scales)), mins(std::move(mins)), qkv_biases(std::move(qkv_biases)),
        out_features(std::move(out_features)), eps(eps), num_heads(num_heads), activation_levels(activation_levels) {
    const size_t layers = this->input_norms.size();
    TORCH_CHECK(this->post_norms.size() == layers && this->panels.size() == 4 * layers &&
                this->scales.size() == 4 * layers && this->mins.size() == 4 * layers &&
                this->out_features.size() == 4 && this->qkv_biases.size() == layers,
                "DecodeStack: per layer one input norm, post norm, qkv bias (or None) and four projections");
  }

  // h [B, hidden] through every layer; k_caches[l], v_caches[l] the layer's caches; the rest as in `layer`.
  torch::Tensor run(const torch::Tensor& h_in, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                    std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, const torch::Tensor& slots,
                    const torch::Tensor& tables, const torch::Tensor& lengths, int64_t block_size) const {
    const size_t layers = input_norms.size();
    TORCH_CHECK(k_caches.size() == layers && v_caches.size() == layers, "DecodeStack.run: a K and V cache per layer");
    auto h = h_in;
    for (size_t l = 0; l < layers; ++l) {
      auto linear = [&](const torch::Tensor& x, int i) {
        const size_t at = 4 * l + i;
        return packed_linear(x, panels[at], scales.get(at), mins.get(at), i == 0 ? qkv_biases.get(l) : std::nullopt,
                             out_features[i], activation_levels);
      };
      h = layer(h, cos, signed_sin, input_norms[l], post_norms[l], eps, linear, k_caches[l], v_caches[l], slots,
                tables, lengths, num_heads, block_size);
    }
    return h;
  }
};

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, double, std::vector<torch::Tensor>,
                       c10::List<std::optional<torch::Tensor>>, c10::List<std::optional<torch::Tensor>>,
                       std::vector<int64_t>, c10::List<std::optional<torch::Tensor>>, int64_t, int64_t>())
      .def("run", &DecodeStack::run);
}
