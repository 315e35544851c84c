"""Block-quantized weights (int4 engines, GGUF Q4_0/Q4_1/Q8_0 kept as they are): the kernel dequantizes
each weight exactly as the reference does and runs panel_linear's chain, so its result is bit for bit the
fp32 kernel's on the dequantized weights, in any batch; a gguf engine holds exactly the weights the fp32
engine built from the same file holds and decodes the same tokens; an int4 engine decodes like HF on its
dequantized weights. Bad inputs name what is supported."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from safetensors.torch import load_file

from sedac import LLM, SamplingParams
from sedac.builder import build_engine
from sedac.builder.convert import convert_checkpoint, model_config_from_hf
from sedac.builder.gguf_blocks import _read, gguf_engine_weights
from sedac.builder.hf_export import dequantized, load_hf_model
from sedac.builder.sources import resolve_source, smollm2_gguf_path
from sedac.cli.build import main as build_main
from sedac.config import BuildConfig
from sedac.models import cpu_kernels
from sedac.models.decoder import fused_decode
from sedac.models.layers import Linear
from sedac.models.quant import (
    BlockWeight,
    from_int8_a8_panels,
    int8_a8_panels,
    pack_nibbles,
    quantize_int4,
    quantize_rows,
    to_panels,
)
from tests.test_cpu_kernels import D, H, _decode_context, _random_layer, pool, run_step  # noqa: F401  (fixture)
from tests.test_parity_tiny import PROMPTS
from tests.test_precisions import fused_steps


@pytest.fixture(autouse=True)
def _kernels():
    assert cpu_kernels.available()
    with torch.inference_mode():
        yield


def _random_blocks(out: int, inp: int, group: int, bits: int) -> BlockWeight:
    scale = (torch.rand(out, inp // group) * 0.1 + 0.01).half()
    if bits == 8:
        return BlockWeight(torch.randint(-128, 128, (out, inp), dtype=torch.int8), scale, None, out)
    codes = torch.randint(0, 16, (out, inp), dtype=torch.uint8)
    return BlockWeight(pack_nibbles(codes), scale, (torch.randn(out, inp // group) * 0.1).half(), out)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(40, 64, 32), (960, 576, 32), (50, 96, 48)])  # out, in, group
@pytest.mark.parametrize("bias", [False, True])
def test_block_linear_is_fp32_panels_on_dequantized_weights(bits, shape, bias):
    torch.manual_seed(bits)
    out, inp, group = shape
    blocks = _random_blocks(out, inp, group, bits)
    dense = blocks.dense()  # [out, in] fp32, the reference values
    packed, b = blocks.panels(), (torch.randn(out) if bias else None)
    assert torch.equal(packed.dense(), dense) and torch.equal(packed.dense(torch.tensor([3, out - 1])), dense[[3, -1]])
    x = torch.randn(13, inp)  # 13 rows: tiles of 6, 3, 2 and 1 rows over the prefixes below
    y = packed.linear(x, b)
    for rows in range(1, 14):
        expected = torch.ops.sedac_cpu.panel_linear(x[:rows], to_panels(dense), b, out)
        assert torch.equal(packed.linear(x[:rows], b), expected)  # bitwise the fp32 chain
        assert torch.equal(y[:rows], expected)  # whatever the batch
    tolerance = 1e-5 * (x.abs() @ dense.abs().t()).max()  # summation order only
    assert (y - (x @ dense.t() + (0 if b is None else b))).abs().max() <= tolerance
    assert (blocks.linear(x, b) - y).abs().max() <= tolerance  # the unpacked (torch) path


@pytest.mark.parametrize(
    "shape", [(40, 64, 32, 4), (960, 576, 32, 4), (50, 96, 48, 4), (40, 64, 32, 8), (1000, 576, 32, 8)]
)  # out, in, group, bits
def test_int8_activation_kernel_is_near_exact_and_batch_invariant(shape):
    """block_linear_a8 (4-bit) and int8_linear_a8 with group scales (8-bit, an int4 engine's head) quantize
    each row's activations per group in two int8 levels (a 15-bit grid) for integer dot products: close to
    the fp32-activation result, not bitwise it, the same in any batch."""
    torch.manual_seed(1)
    out, inp, group, bits = shape
    blocks = _random_blocks(out, inp, group, bits)
    packed = blocks.panels(int8_activations=True)
    assert packed.int8_activations and torch.equal(packed.dense(), blocks.dense())  # same weights, new layout
    assert torch.equal(packed.dense(torch.tensor([3, out - 1])), blocks.dense()[[3, -1]])  # rows read in place
    x = torch.randn(13, inp) * torch.linspace(0.1, 3, inp)  # channels of different scales
    x[2, :group] = 0  # a zero group
    y = packed.linear(x, None)
    for rows in range(1, 14):
        assert torch.equal(packed.linear(x[:rows], None), y[:rows])  # batch-invariant
    exact = blocks.panels().linear(x, None)  # fp32 activations
    assert not torch.equal(y, exact)  # it took the integer path,
    assert (y - exact).norm() < 1e-3 * exact.norm()  # whose activation grid is fine


@pytest.mark.parametrize("shape", [(40, 64), (960, 576), (50, 1536)])  # out, in
def test_int8_activation_kernel_on_int8_weights_is_near_exact_and_batch_invariant(shape):
    """int8_linear_a8 (int8 engines on VNNI): offset int8 codes against activations on the same two-level
    grid; close to int8_panel_linear's fp32-activation result, the same in any batch."""
    torch.manual_seed(2)
    out, inp = shape
    weight, scale = quantize_rows(torch.randn(out, inp))
    codes = int8_a8_panels(weight)
    assert codes.shape == (-(-out // 16), inp // 4, 64) and torch.equal(from_int8_a8_panels(codes, out), weight)
    x = torch.randn(13, inp) * torch.linspace(0.1, 3, inp)
    x[2, :32] = 0  # a zero group
    bias = torch.randn(out)
    y = torch.ops.sedac_cpu.int8_linear_a8(x, codes, scale, bias, out)
    for rows in range(1, 14):
        assert torch.equal(torch.ops.sedac_cpu.int8_linear_a8(x[:rows], codes, scale, bias, out), y[:rows])
    exact = torch.ops.sedac_cpu.int8_panel_linear(x, to_panels(weight), scale, bias, out)
    assert not torch.equal(y, exact)  # it took the integer path,
    assert (y - exact).norm() < 1e-4 * exact.norm()  # whose activation grid is fine
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.sedac_cpu.int8_linear_a8(x[:, :48], codes[:, :12], scale, None, out)


def _int8_grid(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x [T, in] on one int8 level per row and group: round(x * 127 / max |x|) * max |x| / 127, in
    csrc/int8_activations.h's fp32 steps."""
    g = x.unflatten(1, (-1, group))
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127)).flatten(1)


@pytest.mark.parametrize("weights", ["4-bit", "8-bit blocks", "int8 rows"])
def test_one_activation_level_is_int8_activations(weights):
    """With one level (w4a8 and w8a8 engines) the integer kernels compute on activations rounded to
    int8 per row and group of 32, llama.cpp's Q8 grid: the reference on those activations up to summation
    order (4-bit blocks' minimums meet the exact activations' sums), coarser than two levels, batch-invariant."""
    torch.manual_seed(3)
    out, inp = 200, 96
    x = torch.randn(13, inp) * torch.linspace(0.1, 3, inp)
    x[2, :32] = 0  # a zero group
    if weights == "int8 rows":
        weight, scale = quantize_rows(torch.randn(out, inp))
        dense, codes = weight.float() * scale[:, None], int8_a8_panels(weight)
        run = lambda rows, levels: torch.ops.sedac_cpu.int8_linear_a8(rows, codes, scale, None, out, levels)  # noqa: E731
        reference = _int8_grid(x) @ dense.t()
    else:
        blocks = _random_blocks(out, inp, 32, 4 if weights == "4-bit" else 8)
        packed, dense = blocks.panels(int8_activations=True), blocks.dense()
        run = lambda rows, levels: BlockWeight(**{**vars(packed), "activation_levels": levels}).linear(rows, None)  # noqa: E731
        minimum = torch.zeros_like(dense) if blocks.minimum is None else blocks.minimum.float().repeat_interleave(32, 1)
        reference = _int8_grid(x) @ (dense - minimum).t() + x @ minimum.t()
    one, two, exact = run(x, 1), run(x, 2), x @ dense.t()
    assert (one - reference).norm() < 1e-5 * reference.norm()
    assert (two - exact).norm() < (one - exact).norm() < 1e-2 * exact.norm()  # the fine level is gone
    for rows in range(1, 14):
        assert torch.equal(run(x[:rows], 1), one[:rows])
    with pytest.raises(RuntimeError, match="activation levels: 1 \\(int8\\) or 2"):
        run(x, 3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("int8_activations", [False, True])
def test_packed_rows_dequantize_like_the_reference(bits, int8_activations):
    """The embedding lookup of block-quantized tables (block_rows.cpp) reads each packed layout exactly as
    the by-rows reference dequantizes it, rows in any order and repeated, and rejects rows outside it."""
    blocks = _random_blocks(40, 96, 32, bits)  # 40 rows: a padded last panel
    packed = blocks.panels(int8_activations)
    index = torch.tensor([0, 39, 17, 17, 5])
    assert torch.equal(packed.dense(index), blocks.dense(index))
    assert torch.equal(packed.dense(), blocks.dense())
    with pytest.raises(RuntimeError, match="row 48 outside the weight"):
        packed.dense(torch.tensor([48]))


def test_int4_quantization_rounds_to_nearest_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    w[3, :32] = 0.7  # a constant group
    blocks = quantize_int4(w, 32)
    assert blocks.codes.shape == (24, 32) and blocks.scale.shape == (24, 2) and blocks.group_size == 32
    step = blocks.scale.float().repeat_interleave(32, dim=1)
    error = (blocks.dense() - w).abs()
    assert (error <= step * 0.5 + 2e-3 * w.abs().amax(1, keepdim=True)).all()  # + the fp16 rounding of the min
    assert torch.equal(blocks.dense()[3, :32], torch.full((32,), torch.tensor(0.7).half().item()))
    with pytest.raises(ValueError, match="--group-size 48 must be even and divide"):
        quantize_int4(w, 48)


def test_block_linear_rejects_mismatched_inputs():
    blocks = _random_blocks(16, 64, 32, 4).panels()
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="4-bit codes take minimums"):
        torch.ops.sedac_cpu.block_linear(x, blocks.codes, blocks.scale, None, None, 16)
    with pytest.raises(RuntimeError, match="matching x"):
        torch.ops.sedac_cpu.block_linear(torch.randn(1, 32), blocks.codes, blocks.scale, blocks.minimum, None, 16)
    with pytest.raises(RuntimeError, match="scales fp16"):
        torch.ops.sedac_cpu.block_linear(x, blocks.codes, blocks.scale.float(), blocks.minimum, None, 16)


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_decode_layer_on_blocks_is_bit_identical_to_python_layer(pool, bits):  # noqa: F811
    layer, ctx = _random_layer(qkv_bias=True), _decode_context([7, 1, 12, 16])
    for linear in layer.modules():
        if isinstance(linear, Linear):
            linear.load_blocks(_random_blocks(linear.out_features, linear.dense_rows().shape[1], 16, bits))
            linear.packed = None
            linear.pack_for_cpu()
    h, cos, signed_sin = torch.randn(4, H * D), torch.randn(4, 1, D), torch.randn(4, 1, D)
    assert layer._fusable(h, ctx, draft=False)
    fused = run_step(layer, pool, ctx, lambda: fused_decode([layer], h, cos, signed_sin, ctx))
    assert torch.equal(fused, run_step(layer, pool, ctx, lambda: layer(h, cos, signed_sin)))


def _engine(tmp_path, source, precision: str, **build):
    path = tmp_path / precision
    build_engine(
        str(source),
        path,
        BuildConfig(
            precision=precision, max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4, **build
        ),
    )
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int4_engine_follows_hf_on_dequantized_weights(tmp_path, tiny_models, arch, monkeypatch):
    """int4 computes with activations on a 15-bit grid per group (and, by default on CPU, an fp16 KV cache),
    so it is HF on its dequantized weights up to that rounding: teacher-forced on its own output, HF picks
    the same token at nearly every position."""
    engine = _engine(tmp_path, tiny_models[arch], "int4", group_size=16)
    weights = load_file(str(engine / "model.safetensors"))
    assert weights["layers.0.down_proj.weight"].dtype == torch.uint8  # 4-bit codes, two a byte
    assert weights["layers.0.down_proj.weight_scale"].shape == (64, 128 // 16)
    hf = load_hf_model(engine)
    llm = LLM(str(engine), device="cpu")
    model = llm.engine.runner.model
    assert model.layers[0].qkv_proj.blocks.int8_activations and not model.int8_weights
    assert model.layers[0].k_cache.dtype == torch.float16  # "auto" for int4 on CPU
    assert model.lm_head.blocks.bits == 8  # the head as 8-bit blocks
    fused = fused_steps(monkeypatch)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    same = total = 0
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.inference_mode():
            choices = hf(ids).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(choices, out.token_ids))
        total += len(out.token_ids)
    assert same >= 0.9 * total, (same, total)
    assert fused  # decode steps ran the fused layer on the blocks


@pytest.mark.parametrize("precision,twin", [("w4a8", "int4"), ("w8a8", "int8")])
def test_int8_activation_engines_hold_int4_and_int8_weights(tmp_path, tiny_models, precision, twin, monkeypatch):
    """w4a8 and w8a8 engines store exactly int4's and int8's weights; their integer kernels take one int8
    level per activation group (llama.cpp's Q8 grid): HF on the dequantized weights picks the same token at
    most positions, and the logits are not the two-level engine's."""
    engines = {p: _engine(tmp_path, tiny_models["llama"], p) for p in (precision, twin)}
    ours, theirs = (load_file(str(engines[p] / "model.safetensors")) for p in (precision, twin))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    llm, twin_llm = (LLM(str(engines[p]), device="cpu", kv_cache_dtype="fp32") for p in (precision, twin))
    qkv = llm.engine.runner.model.layers[0].qkv_proj
    assert qkv.activation_levels == 1 and qkv.kernel_levels(draft=False) == 1
    assert twin_llm.engine.runner.model.layers[0].qkv_proj.kernel_levels(draft=False) == 2
    fused = fused_steps(monkeypatch)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    assert fused  # decode steps ran the fused layer, with one level
    hf = load_hf_model(engines[precision])
    same = total = 0
    for prompt, out in zip(PROMPTS, outs):
        with torch.inference_mode():
            choices = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].argmax(-1)
        same += sum(a == b for a, b in zip(choices.tolist(), out.token_ids))
        total += len(out.token_ids)
    assert same >= 0.8 * total, (same, total)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    one, two = (m.generate([PROMPTS[0]], params)[0].outputs[0].logprobs[0] for m in (llm, twin_llm))
    assert one != two


def test_w4a8_without_integer_kernels_says_it_runs_as_int4(tmp_path, tiny_models, monkeypatch, caplog):
    engine = _engine(tmp_path, tiny_models["llama"], "w4a8")
    monkeypatch.setattr(cpu_kernels, "integer_dot_products", lambda: False)
    llm = LLM(str(engine), device="cpu")
    assert "w4a8: activations stay float32 on cpu here (int8 activations need the C++ CPU kernels" in caplog.text
    assert not llm.engine.runner.model.layers[0].qkv_proj.blocks.int8_activations  # the fp32-activation kernel
    assert len(llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0].token_ids) == 4


def test_int4_engine_without_kernels_dequantizes_at_load(tmp_path, tiny_models, monkeypatch, caplog):
    engine = _engine(tmp_path, tiny_models["llama"], "int4", group_size=16)  # fp32 K/V: the weights' paths compared
    with_kernels = [
        o.token_ids
        for o in LLM(str(engine), device="cpu", kv_cache_dtype="fp32").generate(
            PROMPTS, SamplingParams(max_tokens=16, temperature=0.0)
        )
    ]
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    llm = LLM(str(engine), device="cpu", kv_cache_dtype="fp32")
    assert "int4 weights have no kernel" in caplog.text
    assert llm.engine.runner.model.layers[0].qkv_proj.blocks is None
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    assert [o.token_ids for o in outs] == with_kernels


def test_quantized_precision_errors(tmp_path, tiny_models):
    runner = CliRunner()
    base = ["--model", str(tiny_models["llama"]), "--output", str(tmp_path / "e"), "--max-seq-len", "256"]
    out = runner.invoke(build_main, [*base, "--precision", "gguf"])
    assert (
        out.exit_code != 0 and "--precision gguf keeps a GGUF file's own blocks and needs a .gguf source" in out.output
    )
    out = runner.invoke(build_main, [*base, "--precision", "int8", "--group-size", "64"])
    assert out.exit_code != 0 and "group_size (--group-size) applies to precisions int4 and w4a8 only" in out.output
    out = runner.invoke(build_main, [*base, "--precision", "int4", "--group-size", "48"])
    assert out.exit_code != 0 and "--group-size 48 must be even and divide" in out.output
    out = runner.invoke(build_main, [*base, "--precision", "int4", "--sedac"])
    assert out.exit_code != 0 and "--sedac needs a base with a cheaper copy" in out.output
    assert not (tmp_path / "e").exists()


def test_gguf_tensor_without_a_kernel_is_named():
    class Q6K:
        name, tensor_type, data = "blk.0.ffn_down.weight", GGMLQuantizationType.Q6_K, np.zeros((4, 210), np.uint8)

    with pytest.raises(
        ValueError, match="blk.0.ffn_down.weight is Q6_K; --precision gguf computes on Q4_0, Q4_1, Q8_0, F16, F32"
    ):
        _read(Q6K)


def test_q4_0_blocks_decode_like_gguf():
    from gguf import quants

    torch.manual_seed(0)
    w = torch.randn(8, 64).numpy()
    raw = quants.quantize(w, GGMLQuantizationType.Q4_0)

    class T:
        name, tensor_type, data = "q", GGMLQuantizationType.Q4_0, raw

    expected = quants.dequantize(raw, GGMLQuantizationType.Q4_0)
    assert np.array_equal(_read(T).dense().numpy(), expected)


def test_gguf_engine_holds_exactly_the_fp32_engines_weights():
    """Every tensor of the real SmolLM2 GGUF (Q4_1 layers, a Q8_0 embedding, F32 norms) read as blocks and
    dequantized is bitwise what transformers' GGUF loader (the fp32 engine's source) gives."""
    source = resolve_source("smollm2-135m-instruct")
    cfg = model_config_from_hf(source.hf_config)
    fp32 = convert_checkpoint(source.tensors(), cfg, torch.float32)
    blocks = dequantized(gguf_engine_weights(smollm2_gguf_path(), cfg))
    assert blocks.keys() == fp32.keys()
    for name, t in fp32.items():
        assert torch.equal(blocks[name], t), name


def test_gguf_engine_decodes_the_fp32_engines_tokens(real_engine, tmp_path_factory):
    """Must show: token-identical to the fp32 engine from the same GGUF on 16 prompts x 64 tokens."""
    from sedac.builder.datasets import sharegpt_prompts

    path = tmp_path_factory.mktemp("gguf") / "smollm2-gguf"
    build_engine("smollm2-135m-instruct", path, BuildConfig(precision="gguf", max_batch_size=16))
    runs = {}
    for name, engine in (("fp32", real_engine), ("gguf", path)):
        llm = LLM(str(engine), kv_cache_memory=1 << 29)
        prompts = sharegpt_prompts(llm.tokenizer, "bench", 16, 128)
        runs[name] = [
            o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
        ]
        if name == "gguf":
            model = llm.engine.runner.model
            assert model.lm_head.blocks.bits == 8 and model.layers[0].gate_up_proj.blocks.bits == 4
    assert runs["gguf"] == runs["fp32"]
