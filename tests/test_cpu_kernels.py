"""The C++ CPU kernels: they are built and load here; paged attention matches an independent per-sequence softmax
attention, agrees with the portable SDPA path on decodes and on short chunks after a cached context,
and rejects lengths outside a block table; the fused elementwise ops match the torch ops they replace
(rotary bit for bit, the norms to the last bit of the RMS reduction); the panel linear matches x @ W
for every tile of rows and gives each row bit for bit the same alone or in a batch; the int8 linear
matches its dequantized weights and the int8 decode layer the Python layer on the same int8 copies."""

import pytest
import torch
import torch.nn.functional as F

from sedac.config import ModelConfig
from sedac.models import AttentionContext, PrefillChunk, attention, cpu_kernels, set_context
from sedac.models.decoder import DecoderLayer, fused_decode
from sedac.models.layers import Linear

BS, KV, H, D, NUM_BLOCKS = 4, 2, 6, 16, 400


@pytest.fixture(autouse=True)
def _inference():
    assert cpu_kernels.available()  # loads torch.ops.sedac_cpu for tests that call the ops directly
    with torch.inference_mode():  # as the engine runs; with autograd on, the kernels stand aside
        yield


@pytest.fixture
def pool():
    torch.manual_seed(0)
    return torch.randn(NUM_BLOCKS * BS, KV, D), torch.randn(NUM_BLOCKS * BS, KV, D)


def _reference(q, k_cache, v_cache, table, length):
    """One query row [H, D] over the first `length` positions of one block table, written out plainly."""
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(length)])
    keys = k_cache[slots].repeat_interleave(H // KV, dim=1)  # [L, H, D]
    values = v_cache[slots].repeat_interleave(H // KV, dim=1)
    weights = (torch.einsum("hd,lhd->hl", q, keys) / D**0.5).softmax(-1)
    return torch.einsum("hl,lhd->hd", weights, values)


def _tables(lengths):
    perm = torch.randperm(NUM_BLOCKS).tolist()  # scattered blocks, as after preemption and reuse
    width = -(-max(lengths) // BS)
    return [perm[i * width : (i + 1) * width] for i in range(len(lengths))]


def test_kernels_load_here():
    assert cpu_kernels.available()  # CI must exercise the kernel, not silently fall back
    assert cpu_kernels.usable(torch.zeros(1))
    with torch.inference_mode(False), torch.enable_grad():
        assert not cpu_kernels.usable(torch.zeros(1))  # no backward: exit-head training runs torch ops


# a lone token, partial and exactly full last blocks, one span of 64 positions exactly, and several spans
LENGTHS = [1, 3, 4, 5, 17, 23, 64, 65, 150]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_plain_attention(pool, dtype):
    """Also on a half-precision pool (--kv-cache-dtype), against the same rounded K/V in fp32."""
    pool = tuple(t.to(dtype) for t in pool)
    tables = _tables(LENGTHS)
    q = torch.randn(len(LENGTHS), H, D)
    out = torch.ops.sedac_cpu.paged_decode_attention(q, *pool, torch.tensor(tables), torch.tensor(LENGTHS), BS, D**-0.5)
    for i, (table, length) in enumerate(zip(tables, LENGTHS)):
        assert torch.allclose(out[i], _reference(q[i], *(t.float() for t in pool), table, length), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (14, 2, 64), (4, 4, 128)])  # SmolLM2, Qwen2
def test_kernel_matches_plain_attention_at_model_head_sizes(dtype, heads, kv_heads, head_dim):
    """Head sizes 64 and 128 take the AVX-512 path (16 scores per reduction round, V accumulated in
    registers): lengths around its 16-position steps and its 64-position spans."""
    torch.manual_seed(3)
    lengths = [1, 15, 16, 17, 63, 64, 65, 200]
    k_cache, v_cache = (torch.randn(NUM_BLOCKS * BS, kv_heads, head_dim).to(dtype) for _ in range(2))
    tables = _tables(lengths)
    q = torch.randn(len(lengths), heads, head_dim)
    out = torch.ops.sedac_cpu.paged_decode_attention(
        q, k_cache, v_cache, torch.tensor(tables), torch.tensor(lengths), BS, head_dim**-0.5
    )
    for i, (table, length) in enumerate(zip(tables, lengths)):
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(length)])
        keys = k_cache[slots].float().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        values = v_cache[slots].float().repeat_interleave(heads // kv_heads, dim=1)
        weights = (torch.einsum("hd,lhd->hl", q[i], keys) * head_dim**-0.5).softmax(-1)
        assert torch.allclose(out[i], torch.einsum("hl,lhd->hd", weights, values), atol=1e-5)


def test_kernel_rows_are_batch_invariant(pool):
    """Spans split a long context at fixed positions: a row's result is bitwise the same alone or in a batch."""
    tables, q = _tables(LENGTHS), torch.randn(len(LENGTHS), H, D)
    batch = torch.ops.sedac_cpu.paged_decode_attention(
        q, *pool, torch.tensor(tables), torch.tensor(LENGTHS), BS, D**-0.5
    )
    for i, (table, length) in enumerate(zip(tables, LENGTHS)):
        alone = torch.ops.sedac_cpu.paged_decode_attention(
            q[i : i + 1], *pool, torch.tensor([table]), torch.tensor([length]), BS, D**-0.5
        )
        assert torch.equal(alone[0], batch[i])


def test_kernel_takes_strided_query_rows(pool):
    qk = torch.randn(3, H + KV, D)  # the decoder slices q out of a fused q|k tensor
    tables, lengths = torch.tensor(_tables([5, 9, 2])), torch.tensor([5, 9, 2])
    strided = torch.ops.sedac_cpu.paged_decode_attention(qk[:, :H], *pool, tables, lengths, BS, D**-0.5)
    dense = torch.ops.sedac_cpu.paged_decode_attention(qk[:, :H].contiguous(), *pool, tables, lengths, BS, D**-0.5)
    assert torch.equal(strided, dense)


def _decode_context(lengths):
    tables = _tables(lengths)
    slots = [table[(n - 1) // BS] * BS + (n - 1) % BS for table, n in zip(tables, lengths)]
    ctx = AttentionContext(torch.tensor(slots), BS, num_decodes=len(lengths))
    ctx.decode_blocks, ctx.decode_lengths = torch.tensor(tables), torch.tensor(lengths)
    return ctx


def test_decode_attention_kernel_agrees_with_sdpa_path(pool, monkeypatch):
    ctx = _decode_context([7, 1, 12, 16])
    q = torch.randn(4, H, D)
    fast = attention._decode_attention(q, *pool, ctx)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert torch.allclose(fast, attention._decode_attention(q, *pool, ctx), atol=1e-5)


def test_short_cached_chunk_kernel_agrees_with_sdpa_path(pool, monkeypatch):
    cached, n = 9, 5  # a verify pass: 5 rows after 9 cached positions
    table = torch.tensor(_tables([cached + n])[0])
    chunk = PrefillChunk(0, n, table, torch.arange(cached + 1, cached + 1 + n))
    q, k, v = torch.randn(n, H, D), torch.randn(n, KV, D), torch.randn(n, KV, D)
    fast = attention._prefill_attention(q, k, v, *pool, chunk, BS)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert torch.allclose(fast, attention._prefill_attention(q, k, v, *pool, chunk, BS), atol=1e-5)


def test_kernel_rejects_length_beyond_table(pool):
    with pytest.raises(RuntimeError, match="outside its block table"):
        torch.ops.sedac_cpu.paged_decode_attention(
            torch.randn(1, H, D), *pool, torch.tensor([[0, 1]]), torch.tensor([2 * BS + 1]), BS, D**-0.5
        )


def test_rms_norm_matches_torch():
    x, w = torch.randn(5, 576) * 3, torch.randn(576)
    fused = torch.ops.sedac_cpu.rms_norm(x, w, 1e-5)
    assert torch.allclose(fused, F.rms_norm(x, (576,), w, 1e-5), rtol=1e-6, atol=1e-6)
    h, delta = torch.randn(5, 576), torch.randn(5, 576)[:, :576]
    total, normed = torch.ops.sedac_cpu.add_rms_norm(h, delta, w, 1e-5)
    assert torch.equal(total, h + delta)
    assert torch.allclose(normed, F.rms_norm(h + delta, (576,), w, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width", [7, 16, 49152 + 5])
def test_argmax_rows_is_torch_argmax(width):
    """Ties go to the first maximum (within a lane and across lanes), a NaN counts as the maximum, a row of
    -inf answers 0, strided rows and a tail past the vector width: the same indices as torch.argmax."""
    torch.manual_seed(0)
    x = torch.randint(-3, 3, (6, width)).float()  # many ties
    x[1] = float("-inf")
    x[2, width // 2] = float("nan")
    x[2, width - 1] = float("nan")
    x[3, width - 1] = 10.0  # the tail's maximum
    x[4, 0] = 10.0
    x[5, width // 3] = x[5, width // 3 + 1 % width] = 10.0
    for rows in (x, x[:, : width - 2], x[::2]):
        assert torch.equal(torch.ops.sedac_cpu.argmax_rows(rows), rows.argmax(dim=-1))


def test_silu_and_mul_matches_torch():
    gate_up = torch.randn(3, 2 * 1536 + 6) * 4  # + a tail past the vector width
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, -88.0, 0.0])  # exp(-g) beyond fp32's range either way
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(torch.ops.sedac_cpu.silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-7)


def test_rotary_is_bit_identical_to_torch_ops():
    qkv = torch.randn(4, (9 + 2 * 3) * 64)
    x = qkv[:, : 12 * 64].view(4, 12, 64)  # q and k heads sliced out of the fused projection
    cos, signed_sin = torch.randn(4, 1, 64), torch.randn(4, 1, 64)
    expected = x * cos + x.roll(32, dims=-1) * signed_sin
    assert torch.equal(torch.ops.sedac_cpu.rotary(x, cos, signed_sin), expected)


def test_fused_ops_reject_wrong_dtype():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.sedac_cpu.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-5)


def _random_layer(qkv_bias: bool) -> DecoderLayer:
    cfg = ModelConfig(
        "LlamaForCausalLM",
        vocab_size=32,
        hidden_size=H * D,
        intermediate_size=80,
        num_layers=1,
        num_heads=H,
        num_kv_heads=KV,
        head_dim=D,
        rms_norm_eps=1e-5,
        rope_theta=1e4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        qkv_bias=qkv_bias,
    )
    layer = DecoderLayer(cfg)
    for p in layer.parameters():
        p.data.normal_(0, 0.2)
    for linear in layer.modules():
        if isinstance(linear, Linear):
            linear.pack_for_cpu()
    return layer


def run_step(layer: DecoderLayer, pool, ctx, run):
    """run() under ctx on fresh copies of the KV pool (kept on the layer for the caller to inspect)."""
    layer.k_cache, layer.v_cache = pool[0].clone(), pool[1].clone()
    set_context(ctx)
    try:
        return run()
    finally:
        set_context(None)


@pytest.mark.parametrize("qkv_bias", [False, True])  # Llama, Qwen2
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])  # --kv-cache-dtype
def test_fused_decode_layer_is_bit_identical_to_python_layer(pool, qkv_bias, kv_dtype):
    pool = tuple(cache.to(kv_dtype) for cache in pool)
    layer, ctx = _random_layer(qkv_bias), _decode_context([7, 1, 12, 16])
    h, cos, signed_sin = torch.randn(4, H * D), torch.randn(4, 1, D), torch.randn(4, 1, D)
    assert layer._fusable(h, ctx, draft=False)
    results = [
        (run_step(layer, pool, ctx, run), layer.k_cache, layer.v_cache)
        for run in (lambda: fused_decode([layer], h, cos, signed_sin, ctx), lambda: layer(h, cos, signed_sin))
    ]
    for fused_tensor, python_tensor in zip(*results):
        assert torch.equal(fused_tensor, python_tensor)
    assert not torch.equal(results[0][1], pool[0])  # the step wrote its K into the cache


@pytest.mark.parametrize("shape", [(44, 13), (576, 960), (7, 40)])  # out a multiple of 16 or padded
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_matches_matmul_and_is_batch_invariant(shape, bias):
    n_in, n_out = shape
    linear = Linear(n_in, n_out, bias=bias)
    linear.weight.data.normal_()
    if bias:
        linear.bias.data.normal_()
    weight = linear.weight.clone()
    linear.pack_for_cpu()
    assert linear.weight is None and torch.equal(linear.dense_rows(), weight.t())
    x = torch.randn(17, n_in)  # 17 rows: tiles of 6, 3, 2 and 1 rows over the prefixes below
    for rows in range(1, 18):
        y = linear(x[:rows])
        assert torch.allclose(y, x[:rows] @ weight + (linear.bias if bias else 0), atol=1e-4, rtol=1e-4)
        assert torch.equal(y, linear(x)[:rows])  # a row's result does not depend on the batch


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 13])  # every tile of x rows and remainders
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("packed", [True, False])  # int8 panels (CPU) or the [out, in] copy (the sedac op, CUDA)
def test_int8_linear_matches_dequantized_weights(rows, bias, packed):
    torch.manual_seed(rows)
    linear = Linear(44, 13, bias=bias)  # in not a multiple of 8, out not of a panel's 16
    linear.weight.data.normal_()
    if bias:
        linear.bias.data.normal_()
    weight = linear.weight.clone()
    if packed:
        linear.pack_for_cpu()
    linear.quantize_int8()
    assert linear.int8[0].dtype == torch.int8 and linear.int8[0].dim() == (3 if packed else 2)
    assert (linear.int8_rows() - weight.t()).abs().max() <= linear.int8[1].max() / 2
    x = torch.randn(rows, 44)
    expected = x @ linear.int8_rows().t() + (linear.bias if bias else 0)
    assert torch.allclose(linear.draft(x), expected, atol=1e-4)
    if packed:
        assert torch.equal(linear.draft(x[:1]), linear.draft(x)[:1])  # batch-invariant, like panel_linear


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_int8_decode_layer_matches_python_layer_on_int8_weights(pool, qkv_bias):
    layer, ctx = _random_layer(qkv_bias), _decode_context([7, 1, 12, 16])
    for linear in layer.modules():
        if isinstance(linear, Linear):
            linear.quantize_int8()
    h, cos, signed_sin = torch.randn(4, H * D), torch.randn(4, 1, D), torch.randn(4, 1, D)
    assert layer._fusable(h, ctx, draft=True)
    runs = {
        "fused": lambda: fused_decode([layer], h, cos, signed_sin, ctx, draft=True),
        "python": lambda: layer(h, cos, signed_sin, draft=True),
        "fp32": lambda: fused_decode([layer], h, cos, signed_sin, ctx),
    }
    out = {name: run_step(layer, pool, ctx, run) for name, run in runs.items()}
    assert torch.equal(out["fused"], out["python"])
    assert not torch.equal(out["fused"], out["fp32"])  # it did run on the int8 copies,
    assert (out["fused"] - out["fp32"]).norm() < 0.05 * out["fp32"].norm()  # which stay close to the weights
