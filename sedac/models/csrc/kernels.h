// The CPU kernels the fused decode layer composes (defined in paged_attention.cpp, fused_ops.cpp,
// panel_linear.cpp, block_linear.cpp, block_linear_a8.cpp, int8_linear_a8.cpp).
#pragma once
#include <torch/extension.h>

#include <tuple>

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& tables,
                                     const torch::Tensor& lengths, int64_t block_size, double scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& h, const torch::Tensor& delta,
                                                      const torch::Tensor& weight, double eps);
torch::Tensor silu_and_mul(const torch::Tensor& gate_up);
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& signed_sin);
torch::Tensor rotary_to_cache(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                              torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                              int64_t num_heads);
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, const std::optional<torch::Tensor>& bias,
                           int64_t out_features);
torch::Tensor int8_panel_linear(const torch::Tensor& x, const torch::Tensor& panels, const torch::Tensor& scale,
                                const std::optional<torch::Tensor>& bias, int64_t out_features);
torch::Tensor block_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                           const std::optional<torch::Tensor>& mins, const std::optional<torch::Tensor>& bias,
                           int64_t out_features);
torch::Tensor block_linear_a8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const torch::Tensor& mins, const std::optional<torch::Tensor>& bias, int64_t out_features,
                              int64_t levels);
torch::Tensor int8_linear_a8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                             const std::optional<torch::Tensor>& bias, int64_t out_features, int64_t levels);
// `count` fp32 panels [count, n, 16] against x [T, n] -> y (row stride ldy), panel_linear's tiles.
void fp32_panel_group(const float* panels, int64_t n, int64_t count, const float* x, int64_t t, float* y, int64_t ldy);
