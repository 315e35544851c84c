"""SEDAC inside the engine step: which decodes take lossless or lossy mode, and running them
(self-speculative cycles on the draft copies; the precision exit on them, or the depth exit).

Each path also reports what it spent per sequence, in batch-1 full-pass units by the pass costs measured on
this device (sedac.runtime.pass_costs: fixed + per_row * rows; every pass's cost shared among its rows): draft
passes, verify rows, precision-exit passes, and the rows a later full pass reruns for exited tokens, beside what
`off` would spend on the same tokens in a batch of the same size. The skip ratio is the share of that saved."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sedac.runtime.early_exit import ExitController, early_exit_step, precision_exit_pays, precision_exit_step
from sedac.runtime.pass_costs import serving_costs
from sedac.runtime.sampling_params import SEDAC_KV_FILLS, SEDAC_LOSSY_EXITS
from sedac.runtime.scheduler import ScheduledBatch
from sedac.runtime.speculative import draft_plan, pass_cost, speculative_step

logger = logging.getLogger(__name__)


@dataclass
class SedacTokens:
    """What a SEDAC path produced for one sequence this step."""

    tokens: list[int]
    logprobs: list
    computed: int  # tokens whose K/V this step completed
    cost: float  # passes spent on the sequence (batch-1 full-pass units)
    off_cost: float  # what `off` would spend on the same tokens
    drafted: int = 0
    accepted: int = 0


class SedacSteps:
    def __init__(
        self,
        runner,
        max_num_seqs: int,
        kv_fill: str,
        lossy_exit: str | None,
        speculative_disable_by_batch_size: int | None,
        engine_dir,
    ):
        if kv_fill not in SEDAC_KV_FILLS:
            raise ValueError(f"sedac_kv_fill must be one of {', '.join(SEDAC_KV_FILLS)}, got {kv_fill!r}")
        if kv_fill == "ghost" and runner.ghost_kv is None:
            raise ValueError(f"{engine_dir} has no Ghost KV predictor; rebuild it with sedac-build --sedac")
        if speculative_disable_by_batch_size is not None and speculative_disable_by_batch_size < 1:
            raise ValueError("speculative_disable_by_batch_size must be >= 1")
        self.runner, self.kv_fill = runner, kv_fill
        self.speculative_disable_by_batch_size = speculative_disable_by_batch_size
        self.sedac = sedac = runner.config.sedac or {}
        self.costs = serving_costs(runner, engine_dir, sedac) if sedac else {}  # this device's pass costs
        self.lossy_exit = _check_lossy_exit(sedac, lossy_exit, engine_dir)
        thresholds = "precision_thresholds" if self.lossy_exit == "precision" else "thresholds"
        self.exit_controller = ExitController(sedac[thresholds], sedac["default_agreement"]) if sedac else None
        self.drafts_by_batch = (
            draft_plan(self.costs, sedac["draft_agreement"], sedac["draft_len"], max_num_seqs) if sedac else []
        )
        if sedac and not any(self.drafts_by_batch):
            logger.warning(
                "SEDAC: the %s draft copy does not pay on %s's measured pass costs (predicted lossless %.2fx): "
                "lossless mode decodes without drafts",
                sedac["draft_precision"], engine_dir, sedac["predicted_lossless_speedup"],
            )  # fmt: skip
        # exit layer -> tokens; the precision exit counts as layer 0 (no full-precision layer ran)
        self.exit_histogram = {
            layer: 0 for layer in ([0] if self.lossy_exit == "precision" else sedac.get("lossy_layers", []))
        }

    def split(self, batch: ScheduledBatch, mode_of):
        """-> (full batch, lossless seqs, lossy seqs). Decodes in lossless or lossy mode take SEDAC's
        paths; everything else runs the full model. Lossless decodes run as plain decodes (same output)
        when the cost model plans no drafts for that many of them (drafts_by_batch: batched decode is
        compute-bound, and verifying drafts there costs more than it saves), or in steps larger than
        speculative_disable_by_batch_size (vLLM's knob)."""
        full, lossless, lossy = ScheduledBatch(), [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            mode = mode_of(seq)
            # lossy: the last token plus the exited ones whose deeper layers are still pending
            decoding = (
                n == len(seq.exit_hidden) + 1
                and not seq.pending_forks
                and seq.num_computed_tokens + n == seq.num_tokens
            )
            if decoding and mode == "lossless":
                lossless.append(seq)
            elif decoding and mode == "lossy":
                lossy.append(seq)
            else:
                seq.exit_hidden = []  # the full path recomputes those tokens through every layer
                full.add(seq, n)
        limit = self.speculative_disable_by_batch_size
        if lossless and (self.batch_drafts(len(lossless)) == 0 or limit is not None and len(batch.seqs) > limit):
            for seq in lossless:
                full.add(seq, 1)
            full.order_decodes_first()
            lossless = []
        return full, lossless, lossy

    def batch_drafts(self, num_seqs: int) -> int:
        return self.drafts_by_batch[min(num_seqs, len(self.drafts_by_batch) - 1)]

    def draft_len(self, seq) -> int:
        """Drafts for a lossless decode step of seq; never past max_tokens or max_seq_len."""
        room = (
            min(seq.params.max_tokens - seq.num_output_tokens, self.runner.config.build.max_seq_len - seq.num_tokens)
            - 1
        )
        return max(0, min(self.sedac["draft_len"], room))

    def lossless(self, seqs, grammar) -> list[SedacTokens]:
        """A draft-and-verify cycle; grammar: the engine's StructuredOutputs (constrained drafts and targets)."""
        k = self.batch_drafts(len(seqs))
        results = speculative_step(
            self.runner,
            seqs,
            [min(k, self.draft_len(s)) for s in seqs],
            self.sedac["draft_max_entropy"],
            self._min_drafting(len(seqs)),
            grammar,
        )
        verify_rows = sum(r.drafted + 1 for r in results)
        return [
            SedacTokens(
                r.tokens,
                r.logprobs,
                len(r.tokens),  # every draft pass it ran in
                sum(self._share("draft", rows, 1) for rows in r.draft_passes)
                + self._share("full", verify_rows, r.drafted + 1),
                self.off_cost(len(seqs)) * len(r.tokens),
                r.drafted,
                r.accepted,
            )
            for r in results
        ]

    @staticmethod
    def rates(counters: dict) -> dict:
        """Engine-wide draft acceptance and skip ratio (the share of off's cost the SEDAC paths saved)."""
        saved = 1.0 - counters["sedac_cost"] / counters["sedac_off_cost"] if counters["sedac_off_cost"] else 0.0
        return {
            "sedac_acceptance_rate": counters["sedac_accepted_tokens"] / max(1, counters["sedac_drafted_tokens"]),
            "sedac_skip_ratio": saved,
        }

    def off_cost(self, num_seqs: int) -> float:
        """A token's share of a full decode pass of num_seqs rows: what `off` spends per token (1 at batch 1)."""
        return self._share("full", num_seqs, 1) if self.sedac else 1.0

    def _share(self, kind: str, total_rows: int, rows: int) -> float:
        """rows' share of a pass of total_rows rows on the "full" weights or the "draft" copies."""
        return pass_cost(self.costs, kind, total_rows) * rows / total_rows if rows else 0.0

    def _min_drafting(self, num_seqs: int) -> float:
        """The share of a batch that must draft for a draft round to pay off, by the build's cost model:
        a round is one draft pass for the batch; each accepted draft saves a full pass of the batch."""
        costs = self.costs
        return pass_cost(costs, "draft", num_seqs) / pass_cost(costs, "full", num_seqs)

    def precision_exit_pays(self, num_seqs: int) -> bool:
        level = self.exit_controller.level(None)
        exit_fraction = self.sedac["precision_exit_fraction"].get(str(level), 0.0)
        return precision_exit_pays(self.costs, exit_fraction, num_seqs)

    def lossy(self, seqs) -> list[SedacTokens]:
        levels = [self.exit_controller.level(s.params.sedac_agreement) for s in seqs]
        num_layers, b = self.runner.config.model.num_layers, len(seqs)
        if self.lossy_exit == "precision":
            pending, draft_pass = [len(s.precision_exits) for s in seqs], self.precision_exit_pays(b)
            results = precision_exit_step(self.runner, seqs, levels, self.exit_controller, draft_pass)
            computed, depth = [1] * b, 0.0
            first_part = [self._share("draft", b, 1) if draft_pass else 0.0] * b
        else:
            pending, layer = [len(s.exit_hidden) for s in seqs], self.sedac["lossy_layers"][0]
            results = early_exit_step(self.runner, seqs, levels, self.exit_controller, layer, self.kv_fill)
            # with deferred fill an exited token's KV is incomplete: it counts as computed once its row has run
            computed, depth = [0 if s.exit_hidden else p + 1 for s, p in zip(seqs, pending)], layer / num_layers
            first_part = [depth * self._share("full", b, 1)] * b
        # a staying token's full layers run its pending exits' rows beside its own
        rows = [p + 1 if r.exit_layer == num_layers else 0 for r, p in zip(results, pending)]
        for r in results:
            if r.exit_layer in self.exit_histogram:
                self.exit_histogram[r.exit_layer] += 1
        return [
            SedacTokens(
                [r.token], [r.logprob], c, first + (1 - depth) * self._share("full", sum(rows), n), self.off_cost(b)
            )
            for r, c, first, n in zip(results, computed, first_part, rows)
        ]


def _check_lossy_exit(sedac: dict, choice: str | None, engine_dir) -> str | None:
    """The engine's lossy exit: the build's choice unless one is asked for (None without SEDAC)."""
    if choice is not None and choice not in SEDAC_LOSSY_EXITS:
        raise ValueError(f"sedac_lossy_exit must be one of {', '.join(SEDAC_LOSSY_EXITS)}, got {choice!r}")
    if not sedac:
        return None
    choice = choice or sedac.get("lossy_exit", "depth")
    if choice == "precision" and "precision_thresholds" not in sedac:
        raise ValueError(f"{engine_dir} has no precision exit calibration; rebuild it with sedac-build --sedac")
    return choice
