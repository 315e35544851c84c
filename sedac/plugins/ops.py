"""torch.library registration: `torch.ops.sedac.{entropy,margin,exit_decision,kv_predict,int8_linear,block_linear}`.

The default (CPU) kernel is the torch reference; CUDA tensors run the Triton kernels when triton is
installed. Fake kernels make the ops traceable by torch.compile.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from sedac.plugins import reference

HAS_TRITON = importlib.util.find_spec("triton") is not None


@torch.library.custom_op("sedac::entropy", mutates_args=())
def entropy(logits: Tensor) -> Tensor:
    return reference.entropy(logits)


@torch.library.custom_op("sedac::margin", mutates_args=())
def margin(logits: Tensor) -> Tensor:
    return reference.margin(logits)


@torch.library.custom_op("sedac::exit_decision", mutates_args=())
def exit_decision(logits: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    return reference.exit_decision(logits, thresholds)


@torch.library.custom_op("sedac::kv_predict", mutates_args=())
def kv_predict(hidden: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return reference.kv_predict(hidden, weight, bias)


@torch.library.custom_op("sedac::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return reference.int8_linear(x, weight, scale, bias)


@torch.library.custom_op("sedac::block_linear", mutates_args=())
def block_linear(x: Tensor, codes: Tensor, scale: Tensor, minimum: Tensor | None, bias: Tensor | None) -> Tensor:
    return reference.block_linear(x, codes, scale, minimum, bias)


@block_linear.register_fake
def _(x, codes, scale, minimum, bias):
    return x.new_empty(x.shape[0], codes.shape[0])


@entropy.register_fake
def _(logits):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@margin.register_fake
def _(logits):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@exit_decision.register_fake
def _(logits, thresholds):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.bool)


@kv_predict.register_fake
def _(hidden, weight, bias):
    return hidden.new_empty(hidden.shape[0], weight.shape[1])


@int8_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


if HAS_TRITON:

    @entropy.register_kernel("cuda")
    def _(logits):
        from sedac.plugins import triton_kernels

        return triton_kernels.entropy(logits)

    @margin.register_kernel("cuda")
    def _(logits):
        from sedac.plugins import triton_kernels

        return triton_kernels.margin(logits)

    @exit_decision.register_kernel("cuda")
    def _(logits, thresholds):
        from sedac.plugins import triton_kernels

        return triton_kernels.exit_decision(logits, thresholds)

    @kv_predict.register_kernel("cuda")
    def _(hidden, weight, bias):
        from sedac.plugins import triton_linear

        return triton_linear.kv_predict(hidden, weight, bias)

    @int8_linear.register_kernel("cuda")
    def _(x, weight, scale, bias):
        from sedac.plugins import triton_linear

        return triton_linear.int8_linear(x, weight, scale, bias)

    @block_linear.register_kernel("cuda")
    def _(x, codes, scale, minimum, bias):
        from sedac.plugins import triton_linear

        return triton_linear.block_linear(x, codes, scale, minimum, bias)
