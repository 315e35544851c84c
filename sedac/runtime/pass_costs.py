"""Measure what a decode pass costs on the machine that serves, for SEDAC's cost model.

A decode pass streams the weights once (a fixed cost) and does arithmetic per row (a cost per row
that dominates once a batch is compute-bound). Both are measured for the full-precision pass and
the draft pass (on the draft copies), at 1 and 8 rows, and fitted as fixed + per_row * rows, in units of a batch-1
full pass. The build's replay (k and the gate at batch 1) and the engine's draft length per batch
size (sedac.runtime.speculative.draft_plan) both read them. An engine served on another device than its
build's (a GPU, say) measures them there once, at load, and keeps them in the engine directory by device.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from sedac.log import logger
from sedac.models.cpu_kernels import cpu_description

CONTEXT = 128  # context length of each measured row (a typical chat turn)
ROWS = (1, 8)
COSTS_FILE = "pass_costs.json"  # {device name: {"full", "draft"}}, measured at load off the build's device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()[0]


def serving_costs(runner, engine_dir, sedac: dict) -> dict:
    """The costs to plan with on the runner's device: the build's where it measured them on this device
    (a build without the record: on CPU), else measured once here and cached in the engine directory."""
    name = device_name(runner.device)
    if sedac.get("costs_device", name if runner.device.type == "cpu" else None) == name:
        return sedac["costs"]
    path = Path(engine_dir) / COSTS_FILE
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if name not in cached:
        logger.info("SEDAC: measuring pass costs on %s (the build's: %s)", name, sedac.get("costs_device"))
        cached[name] = measure_pass_costs(runner)
        try:
            path.write_text(json.dumps(cached, indent=2))
        except OSError as e:  # a read-only engine directory: measured again at the next load
            logger.warning("SEDAC: pass costs for %s not cached (%s)", name, e)
    return {**sedac["costs"], **cached[name]}


@torch.inference_mode()
def measure_pass_costs(runner, repeats: int = 20) -> dict:
    """-> {"full": [fixed, per_row], "draft": [fixed, per_row]}, a full pass at 1 row = 1. The four
    passes are timed in turn, each its fastest of `repeats` (the least disturbed by other work)."""
    bs = runner.block_size
    per_seq = CONTEXT // bs + 1
    passes = {}
    for rows in ROWS:
        positions, ctx = runner.context([(list(range(i * per_seq, (i + 1) * per_seq)), CONTEXT) for i in range(rows)])
        ids = torch.zeros(rows, dtype=torch.long, device=runner.device)
        for draft in (False, True):
            graph = None if draft or runner.graphs is None else runner.graphs.graphs.get(rows)
            # the full pass as `off` decodes: a CUDA graph's replay where there is one (its padding rows
            # write only the scratch block), else eager; draft passes run eagerly
            passes[(rows, draft)] = graph.replay if graph else partial(_decode_pass, runner, ids, positions, ctx, draft)
    seconds = {key: float("inf") for key in passes}
    with scratch_kv(runner.model, max(ROWS) * per_seq * bs):
        for fn in passes.values():
            fn()  # warm-up
        for _ in range(repeats):
            for key, fn in passes.items():
                start = time.perf_counter()
                fn()
                if runner.device.type == "cuda":  # the pass's kernels, not their launches
                    torch.cuda.synchronize(runner.device)
                seconds[key] = min(seconds[key], time.perf_counter() - start)
    unit = seconds[(1, False)]
    costs = {}
    for name, draft in (("full", False), ("draft", True)):
        per_row = (seconds[(ROWS[1], draft)] - seconds[(ROWS[0], draft)]) / (ROWS[1] - ROWS[0]) / unit
        costs[name] = [seconds[(1, draft)] / unit - per_row, per_row]
    return costs


def _decode_pass(runner, ids, positions, ctx, draft: bool) -> torch.Tensor:
    return runner.model.logits(runner.run(ids, None, positions, ctx, draft=draft), draft=draft)


@contextmanager
def scratch_kv(model, num_slots: int):
    """K/V go to scratch caches of num_slots slots meanwhile: an engine's pool (and the prefix cache
    in it) is never touched."""
    m, pools = model.cfg, [(layer.k_cache, layer.v_cache) for layer in model.layers]
    dtype, dev = model.norm.weight.dtype, model.norm.weight.device  # the compute dtype
    try:
        for layer in model.layers:
            layer.k_cache = torch.zeros(num_slots, m.num_kv_heads, m.head_dim, dtype=dtype, device=dev)
            layer.v_cache = torch.zeros(num_slots, m.num_kv_heads, m.head_dim, dtype=dtype, device=dev)
        yield
    finally:
        for layer, (k, v) in zip(model.layers, pools):
            layer.k_cache, layer.v_cache = k, v
