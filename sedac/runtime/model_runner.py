"""Loads the engine's weights, owns the KV pool, and turns a scheduled batch into logits."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sedac.config import (
    INT8_ACTIVATION_PRECISIONS,
    KV_CACHE_DTYPES,
    MIN_SUFFIX,
    PRECISIONS,
    SCALE_SUFFIX,
    SEDAC_WEIGHTS_FILE,
    WEIGHTS_FILE,
    DeviceOptions,
    EngineConfig,
    weight_format,
)
from sedac.log import logger
from sedac.models import AttentionContext, DecoderModel, PrefillChunk, cpu_kernels, set_context
from sedac.models.attention import VarlenBatch
from sedac.models.exit_head import ExitHead
from sedac.models.layers import Linear
from sedac.models.quant import BlockWeight
from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac)
from sedac.runtime.cuda_graphs import DecodeGraphs, batch_sizes
from sedac.runtime.scheduler import ScheduledBatch


def _load_quantized(model: DecoderModel, weights: dict[str, torch.Tensor]) -> None:
    """Weight-only layers take their codes and scales out of `weights`: int8 rows (one scale per output,
    int8 engines) or blocks (2-D scales: int4 and gguf engines, whose embedding table may be blocks too)."""
    for name in [k for k in weights if k.endswith(SCALE_SUFFIX)]:
        prefix = name[: -len(SCALE_SUFFIX)]
        try:
            module = model.get_submodule(prefix)
            weight = weights.pop(prefix + ".weight")
        except (AttributeError, KeyError):
            raise ValueError(f"engine weights do not match its config (stray {name})") from None
        scale, minimum = weights.pop(name), weights.pop(prefix + MIN_SUFFIX, None)
        if scale.dim() == 1:
            module.load_int8(weight, scale.float())
        elif prefix == "embed_tokens":
            model.load_embedding_blocks(BlockWeight(weight, scale, minimum, weight.shape[0]))
        else:
            module.load_blocks(BlockWeight(weight, scale, minimum, module.out_features))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if not device.startswith(("cpu", "cuda")):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


# Engines whose "auto" KV pool on CPU is fp16: int8 and int4 decode measured 1.07-1.12x faster at 256
# positions and 1.22x at 1,024 with an fp16 pool, and the same greedy tokens on 16 held-out prompts x 64
# (2026-11-30). fp32 and gguf engines keep fp32 K/V (token-identical to HF, to the fp32 engine); fp16 and
# bf16 engines too (one prompt of the 16 left at a near-tie).
HALF_KV_PRECISIONS = ("int8", "int4")


def _kv_dtype(name: str, compute_dtype: torch.dtype, precision: str, device: torch.device) -> torch.dtype:
    """--kv-cache-dtype: "auto" keeps K/V at the compute dtype (fp16 for HALF_KV_PRECISIONS on CPU); a half
    pool on CPU halves the bytes each decode step streams (the attention kernel widens rows in registers),
    K/V rounded once when written."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    if KV_CACHE_DTYPES[name] is not None:
        return getattr(torch, KV_CACHE_DTYPES[name])
    half = device.type == "cpu" and weight_format(precision) in HALF_KV_PRECISIONS
    return torch.float16 if half else compute_dtype


class ModelRunner:
    def __init__(self, engine_dir: Path, config: EngineConfig, device: torch.device, options: DeviceOptions):
        self.config, self.device, self.options = config, device, options
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # cuda:N: Triton launches and graph captures go to the current device
        # The engine's float weights are stored at its precision; on CPU every step computes in fp32
        # (the kernels widen fp16/bf16 weights in registers; torch's own half matmuls are ~17x slower).
        self.weight_dtype = getattr(torch, PRECISIONS[config.build.precision])
        self.dtype = torch.float32 if device.type == "cpu" else self.weight_dtype
        self.kv_dtype = _kv_dtype(options.kv_cache_dtype, self.dtype, config.build.precision, device)
        self.block_size = config.build.kv_block_size
        self.varlen = device.type == "cuda" and _has_triton()  # attention through the Triton kernel
        self.model = self._load_model(engine_dir)
        if config.sedac:  # SEDAC's drafter and precision exit: a cheaper copy of the weights
            self.make_draft_copies(config.sedac["draft_precision"])
        if self._cpu_kernels():
            self.model.screen_greedy_head(self._integer_kernels())  # measured on CPU only (models/greedy_head.py)
        self.exit_heads, self.ghost_kv = self._load_sedac_weights(engine_dir) if config.sedac else ({}, None)
        self.num_blocks = self._allocate_kv_cache(options.kv_cache_memory)
        self.graphs = None
        if self.varlen and not options.enforce_eager:
            self.graphs = DecodeGraphs(self, options.max_num_seqs)
        if device.type == "cpu":
            logger.info(cpu_kernels.status().line())

    def _load_model(self, engine_dir: Path) -> DecoderModel:
        path = Path(engine_dir) / WEIGHTS_FILE
        if not path.is_file():
            raise ValueError(f"engine weights missing: {path}")
        try:
            weights = load_file(str(path), device=str(self.device))
        except Exception as e:
            raise ValueError(f"corrupt engine weights {path}: {e}") from None
        model = DecoderModel(self.config.model, self.config.build.max_seq_len)
        _load_quantized(model, weights)
        tied = self.config.model.tie_word_embeddings
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        except RuntimeError as e:
            raise ValueError(f"engine weights do not match its config: {str(e).splitlines()[0]}") from None
        if unexpected or set(missing) != ({"lm_head.weight"} if tied else set()):
            raise ValueError(f"engine weights do not match its config (missing {missing}, unexpected {unexpected})")
        if tied:
            model.tie_lm_head()
        block_kernels = self._cpu_kernels() if self.device.type == "cpu" else ops.HAS_TRITON
        if weight_format(self.config.build.precision) in ("int4", "gguf") and not block_kernels:
            self._dequantize_blocks(model)
        model = self._pack_for_cpu(model.to(self.device).eval()).to(self.dtype)  # packed panels keep their dtype
        if (precision := self.config.build.precision) in INT8_ACTIVATION_PRECISIONS and not self._integer_kernels():
            logger.warning(
                f"{precision}: activations stay {str(self.dtype).removeprefix('torch.')} on {self.device.type} here "
                f"(int8 activations need the C++ CPU kernels on AVX-512 VNNI): it runs as {weight_format(precision)}"
            )
        model.embed_tokens.to(self.weight_dtype)  # gathered rows are widened (DecoderModel.embed)
        return model

    def make_draft_copies(self, precision: str) -> None:
        """The model's draft copies at `precision` ("int8" or "int4"), on the kernels this device runs:
        an int4 copy takes int8 activations where the CPU has VNNI, like an int4 engine."""
        self.model.make_draft_copies(precision, self._integer_kernels())

    def _dequantize_blocks(self, model: DecoderModel) -> None:
        """Block weights need the C++ kernels on CPU, Triton on CUDA: without them they are dequantized
        once, at load."""
        logger.warning(
            f"{self.config.build.precision} weights have no kernel on {self.device.type} here "
            f"({'no C++ CPU kernels' if self.device.type == 'cpu' else 'no Triton'}): dequantized to "
            f"{self.weight_dtype} at load (the memory and speed of a {self.weight_dtype} engine)"
        )
        if model.embed_tokens.weight is None:  # before the head: a tied table reads the head's blocks
            table = model.embed(torch.arange(self.config.model.vocab_size, device=self.device))
            model.embed_tokens.weight = nn.Parameter(table.to(self.weight_dtype), requires_grad=False)
        for linear in model.modules():
            if isinstance(linear, Linear) and linear.blocks is not None:
                linear.dequantize_blocks(self.weight_dtype)

    def _load_sedac_weights(self, engine_dir: Path) -> tuple[dict[int, ExitHead], tuple | None]:
        """The exit heads the modes use and the Ghost KV predictor (weight, bias), if the build made one."""
        path = Path(engine_dir) / SEDAC_WEIGHTS_FILE
        if not path.is_file():
            raise ValueError(f"engine config has SEDAC exits but {path} is missing")
        weights = load_file(str(path), device=str(self.device))
        m, heads, sedac = self.config.model, {}, self.config.sedac
        for layer in sedac["lossy_layers"]:  # the heads lossy mode uses
            state = {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"exit.{layer}.")}
            head = ExitHead(m.hidden_size, sedac["adapter_rank"], state["vocab_ids"], m.rms_norm_eps)
            head.load_state_dict(state, assign=True)
            heads[layer] = self._pack_for_cpu(head.to(device=self.device, dtype=self.dtype).eval())
        ghost = (
            tuple(weights[f"ghost_kv.{n}"].to(self.dtype) for n in ("weight", "bias"))
            if "ghost_kv.weight" in weights
            else None
        )
        # A torch.library op's first dispatch imports torch._dynamo (~3 s on CPU): pay it at load,
        # not in the first SEDAC request's latency.
        torch.ops.sedac.entropy(torch.zeros(1, 2, device=self.device))
        return heads, ghost

    def _pack_for_cpu(self, module: nn.Module) -> nn.Module:
        """On CPU every Linear runs on panels packed at the weights' precision (see Linear.pack_for_cpu);
        int4 and int8 engines' weight-only layers take int8 activations (csrc/block_linear_a8.cpp,
        csrc/int8_linear_a8.cpp) where the CPU has VNNI, else the kernels on fp32 activations; w4a8 and
        w8a8 engines' one int8 level per group, int4 and int8 engines' two."""
        if self._cpu_kernels():
            precision = self.config.build.precision
            int8_activations = weight_format(precision) in ("int4", "int8") and self._integer_kernels()
            levels = 1 if precision in INT8_ACTIVATION_PRECISIONS else 2
            for linear in module.modules():
                if isinstance(linear, Linear):
                    linear.pack_for_cpu(int8_activations, levels)
        return module

    def _integer_kernels(self) -> bool:
        return self._cpu_kernels() and cpu_kernels.integer_dot_products()

    def _cpu_kernels(self) -> bool:
        return self.device.type == "cpu" and cpu_kernels.available()

    def kv_bytes_per_block(self) -> int:
        m = self.config.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self.kv_dtype.itemsize

    def _allocate_kv_cache(self, budget: int | None) -> int:
        b = self.config.build
        per_block = self.kv_bytes_per_block()
        wanted = b.max_batch_size * -(-b.max_seq_len // self.block_size)
        if budget is None and self.device.type == "cuda":
            budget = self._free_kv_memory()
        num_blocks = wanted if budget is None else min(wanted, budget // per_block)
        if num_blocks * self.block_size < b.max_seq_len:
            raise ValueError(
                f"KV cache budget holds {num_blocks * self.block_size} tokens, "
                f"less than one max_seq_len={b.max_seq_len} sequence"
            )
        # One block more on CUDA: the padding rows of a captured decode graph write their K/V there.
        self._set_kv_pool(num_blocks + (1 if self.varlen else 0))
        self.kv_cache_bytes = num_blocks * per_block
        return num_blocks

    def _set_kv_pool(self, num_blocks: int) -> None:
        m = self.config.model
        # Zeroed, not empty: attention reads whole blocks and masks the unused slots, and a masked
        # NaN left in uninitialized memory would still poison the weighted sum (0 * NaN = NaN).
        for layer in self.model.layers:
            shape = (num_blocks * self.block_size, m.num_kv_heads, m.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    def _free_kv_memory(self) -> int:
        """Bytes the memory options leave for the KV pool once the weights are loaded, a full step's
        activations measured (vLLM's profile run) and the decode graphs' logits buffer set aside; too
        little is an error."""
        peak = self._activation_peak()
        if self.varlen and not self.options.enforce_eager:
            peak += batch_sizes(self.options.max_num_seqs)[-1] * self.config.model.vocab_size * 4  # graphs' logits
        free, total = torch.cuda.mem_get_info(self.device)
        budget, rule = kv_budget(self.options, free, total, peak)
        gib = 2**30
        one_sequence = self.kv_bytes_per_block() * -(-self.config.build.max_seq_len // self.block_size)
        if budget < one_sequence:
            raise ValueError(
                f"{rule} leaves {budget / gib:.2f} GiB for the KV cache ({(total - free) / gib:.1f} GiB in use, "
                f"{peak / gib:.2f} GiB a step's activations), less than one {self.config.build.max_seq_len}-token "
                f"sequence needs ({one_sequence / gib:.2f} GiB): raise it, or lower max_model_len or "
                "max_num_batched_tokens"
            )
        return budget

    @torch.inference_mode()
    def _activation_peak(self) -> int:
        """Bytes a prefill step of max_num_batched_tokens allocates beyond the weights (sequences of at most
        max_seq_len on a pool of their own), logits and the sampler's sort for max_num_seqs rows included."""
        total, length = self.options.max_num_batched_tokens, self.config.build.max_seq_len
        sizes = [min(length, total - start) for start in range(0, total, length)]
        per_seq = -(-length // self.block_size)
        self._set_kv_pool(per_seq * len(sizes))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        chunks = [(list(range(i * per_seq, (i + 1) * per_seq)), 0, n) for i, n in enumerate(sizes)]
        positions, ctx = self.context([], chunks)
        hidden = self.run(torch.zeros(total, dtype=torch.int64, device=self.device), None, positions, ctx)
        rows = min(total, self.options.max_num_seqs)
        self.model.logits(hidden[:rows]).float().sort(dim=-1, descending=True)  # as filtered_probs sorts
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self._set_kv_pool(0)
        torch.cuda.empty_cache()
        return peak

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks before this step writes into the copies."""
        if not copies:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + i for s, _ in copies for i in range(bs)], device=self.device)
        dst = torch.tensor([d * bs + i for _, d in copies for i in range(bs)], device=self.device)
        for layer in self.model.layers:
            layer.k_cache[dst] = layer.k_cache[src]
            layer.v_cache[dst] = layer.v_cache[src]

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, sample_rows: list[int], argmax_only: bool = False) -> torch.Tensor:
        """Run the step; return logits [len(sample_rows), vocab] for the given token rows (argmax_only:
        see DecoderModel.logits)."""
        if self.graphs is not None and self.graphs.fits(batch):
            logits = self.graphs.replay(batch)  # a row per sequence; a one-token prompt chunk samples nothing
            return logits if len(sample_rows) == len(logits) else logits[sample_rows]
        input_ids, positions, ctx = self.prepare(batch)
        hidden = self.run(input_ids, None, positions, ctx)
        rows = hidden if len(sample_rows) == len(hidden) else hidden[sample_rows]  # every row: no index copy
        return self.model.logits(rows, argmax_only=argmax_only).float()

    def prepare(self, batch: ScheduledBatch):
        """Decodes (one new token) first, then prefill chunks; returns ids, positions, context."""
        ids, decodes, chunks = [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ids += seq.token_ids[start : start + n]
            if n == 1:
                decodes.append((seq.block_table, start))
            else:
                chunks.append((seq.block_table, start, n))
        positions, ctx = self.context(decodes, chunks)
        return self.to_device(ids)[0], positions, ctx

    def context(self, decodes: list[tuple[list[int], int]], chunks: list[tuple[list[int], int, int]] = ()):
        """Attention context for rows laid out as decodes (block table, position), then chunks
        (block table, first position, length); -> (positions [T], context)."""
        bs, dev = self.block_size, self.device
        pos = [p for _, p in decodes] + [p for _, start, n in chunks for p in range(start, start + n)]
        tables = [t for t, _ in decodes] + [t for t, _, n in chunks for _ in range(n)]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos)]
        if self.varlen:
            return self._varlen_context(decodes, chunks, pos, slots)
        ctx = AttentionContext(torch.tensor(slots, device=dev), bs, num_decodes=len(decodes))
        if decodes:
            blocks = [t[: p // bs + 1] for t, p in decodes]
            width = max(len(b) for b in blocks)
            ctx.decode_blocks = torch.tensor([b + [0] * (width - len(b)) for b in blocks], device=dev)
            ctx.decode_lengths = torch.tensor([p + 1 for _, p in decodes], device=dev)
        row = len(decodes)
        for table, start, n in chunks:
            ctx.prefills.append(_prefill_chunk(row, row + n, table[: -(-(start + n) // bs)], start, dev))
            row += n
        return torch.tensor(pos, device=dev), ctx

    def _varlen_context(self, decodes, chunks, pos: list[int], slots: list[int]):
        """The Triton kernel's context: each decode and chunk one sequence of a varlen batch, every
        integer of the step in one host-to-device copy (-> positions [T], context)."""
        lengths = [1] * len(decodes) + [n for _, _, n in chunks]
        context_lens = [p + 1 for _, p in decodes] + [start + n for _, start, n in chunks]
        tables = [t for t, _ in decodes] + [t for t, _, _ in chunks]
        width = max(-(-c // self.block_size) for c in context_lens)
        padded = [b for t in tables for b in t[:width] + [0] * (width - len(t[:width]))]
        starts = [0, *itertools.accumulate(lengths)]
        positions, slot_mapping, query_starts, lens, flat = self.to_device(pos, slots, starts, context_lens, padded)
        varlen = VarlenBatch(query_starts, lens, flat.view(len(tables), width), max(lengths))
        return positions, AttentionContext(slot_mapping, self.block_size, num_decodes=len(decodes), varlen=varlen)

    def to_device(self, *lists: list[int]) -> list[torch.Tensor]:
        """Integer lists -> int64 tensors on the device; on CUDA through one pinned buffer and one
        asynchronous copy (five blocking copies a step otherwise)."""
        if self.device.type == "cpu":
            return [torch.tensor(x, dtype=torch.int64) for x in lists]
        flat = torch.tensor(list(itertools.chain(*lists)), dtype=torch.int64, pin_memory=True)
        return list(flat.to(self.device, non_blocking=True).split([len(x) for x in lists]))

    def span_context(self, spans: list[tuple[list[int], int, int]]):
        """Short spans after a cached context (drafts to verify, deferred exits) as (block table, first
        position, length), each row laid out as a decode at its own position: it attends up to itself,
        the span's earlier rows being written in the same layer call, so the fused CPU decode layer
        runs them too. -> (positions [T], context)."""
        return self.context([(table, start + j) for table, start, n in spans for j in range(n)])

    def run(
        self,
        ids: torch.Tensor | None,
        hidden: torch.Tensor | None,
        positions: torch.Tensor,
        ctx,
        start: int = 0,
        end: int | None = None,
        draft: bool = False,
    ) -> torch.Tensor:
        """Layers [start, end) over token ids (start 0) or hidden states under ctx -> hidden [T, H];
        draft: on the draft copies (a draft pass)."""
        set_context(ctx)
        try:
            h = self.model.embed(ids) if hidden is None else hidden
            return self.model.run_layers(h, positions, start, end, draft)
        finally:
            set_context(None)


def kv_budget(options: DeviceOptions, free: int, total: int, peak: int) -> tuple[int, str]:
    """(KV pool bytes, the rule that gave them) from the device's free and total bytes once the weights are
    loaded and a step's activation peak: vLLM's gpu_memory_utilization (default 0.9) of the total less what
    is in use and the peak, or TensorRT-LLM's kv_cache_free_gpu_memory_fraction of what is free after both."""
    if options.kv_cache_free_gpu_memory_fraction is not None:
        fraction = options.kv_cache_free_gpu_memory_fraction
        return int(fraction * (free - peak)), f"kv_cache_free_gpu_memory_fraction {fraction} of what is free"
    fraction = 0.9 if options.gpu_memory_utilization is None else options.gpu_memory_utilization
    rule = f"gpu_memory_utilization {fraction} of {total / 2**30:.1f} GiB"
    return int(fraction * total) - (total - free) - peak, rule


def _has_triton() -> bool:
    if not ops.HAS_TRITON:
        logger.warning("CUDA without triton: attention gathers every block table per layer (pip install triton)")
    return ops.HAS_TRITON


def _prefill_chunk(start, end, blocks, cached, dev) -> PrefillChunk:
    table = torch.tensor(blocks, device=dev)
    if cached == 0:
        return PrefillChunk(start, end, table)
    return PrefillChunk(start, end, table, torch.arange(cached + 1, cached + 1 + end - start, device=dev), cached)
