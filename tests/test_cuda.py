"""The CUDA path on a GPU (skipped without one; tools/gpu_check.sh runs it on a lent H200): greedy decoding
token-identical to HF transformers at fp32 with TF32 off, CUDA-graph decode identical to eager, seeded
sampling independent of the batch, and the KV pool sized from free memory."""

import os

import pytest
import torch

from sedac import LLM, SamplingParams
from tests.conftest import hf_greedy
from tests.test_parity_tiny import PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(autouse=True)
def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_hf_on_cuda_with_graphs_and_eager(arch, tiny_models, tiny_engines):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).cuda().eval()
    expected = [hf_greedy(hf, p, 24) for p in PROMPTS]
    graphs = LLM(str(tiny_engines[arch]), device="cuda", gpu_memory_utilization=0.2)
    assert graphs.engine.runner.graphs is not None
    assert [o.token_ids for o in graphs.generate(PROMPTS, GREEDY)] == expected
    assert graphs.engine.runner.graphs.replays > 0  # decode steps ran as graphs
    eager = LLM(str(tiny_engines[arch]), device="cuda", enforce_eager=True, kv_cache_memory=1 << 24)
    assert eager.engine.runner.graphs is None
    assert [o.token_ids for o in eager.generate(PROMPTS, GREEDY)] == expected


def test_prefix_cache_and_chunked_prefill_on_cuda(tiny_llama):
    """A shared prefix (prefix-cache hit, then a chunk after cached context) and prompts longer than a step."""
    cpu = LLM(str(tiny_llama), device="cpu")
    gpu = LLM(str(tiny_llama), device="cuda", kv_cache_memory=1 << 24, max_num_batched_tokens=32)
    prefix = list(range(200, 260))
    prompts = [prefix + [7, 8, 9], prefix + [10, 11], list(range(300, 400))]
    first = gpu.generate(prompts[:1], GREEDY)
    rest = gpu.generate(prompts[1:], GREEDY)
    assert gpu.engine.blocks.prefix_hits > 0
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in cpu.generate(prompts, GREEDY)]


def test_seeded_sampling_is_independent_of_the_batch(tiny_llama):
    llm = LLM(str(tiny_llama), device="cuda", kv_cache_memory=1 << 24)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    alone = llm.generate([PROMPTS[0]], params)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=0.8, seed=s) for s in range(5)]
    crowded = llm.generate(PROMPTS[1:] + [PROMPTS[0]] + PROMPTS[1:3], others[:3] + [params] + others[3:])
    assert crowded[3].token_ids == alone
    assert llm.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=8))[0].token_ids != alone


def test_kv_pool_sized_from_free_memory(tiny_llama):
    llm = LLM(str(tiny_llama), device="cuda", gpu_memory_utilization=0.3)
    runner = llm.engine.runner
    build = runner.config.build
    assert runner.num_blocks == build.max_batch_size * -(-build.max_seq_len // build.kv_block_size)  # capped
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.0001 .* less than one"):
        LLM(str(tiny_llama), device="cuda", gpu_memory_utilization=0.0001)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_llama), device="cuda", max_model_len=build.max_seq_len + 1)


@pytest.fixture
def sedac_engine(request, tmp_path):
    """The tiny SEDAC engine (its build reads ShareGPT, absent on a GPU machine: gpu_check.sh carries one)."""
    import shutil

    carried = os.environ.get("SEDAC_TEST_SEDAC_ENGINE")
    source = carried or request.getfixturevalue("tiny_sedac_engine")
    shutil.copytree(source, tmp_path / "engine")
    return tmp_path / "engine"


def test_sedac_on_cuda_plans_with_costs_measured_there_and_stays_lossless(sedac_engine):
    import json

    from sedac.runtime.pass_costs import COSTS_FILE

    llm = LLM(str(sedac_engine), device="cuda", kv_cache_memory=1 << 24)
    costs = json.loads((sedac_engine / COSTS_FILE).read_text())
    assert (
        list(costs) == [torch.cuda.get_device_name()]
        and llm.engine.sedac.costs["full"] == costs[list(costs)[0]]["full"]
    )
    off = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, sedac_mode="off"))
    lossless = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, sedac_mode="lossless"))
    assert [o.token_ids for o in lossless] == [o.token_ids for o in off]
