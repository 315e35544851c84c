"""`sedac-build --sedac`: train exit heads, calibrate the lossy exits (depth and precision) and the
lossless drafter, and pick each by the cost model: the exit layer, and the drafter's precision (a copy
of the weights cheaper than the base: int8 or int4) by each candidate's measured pass costs and
agreement.

Training data: ShareGPT conversations (train split) under teacher forcing. Calibration data: the
model's own greedy answers to held-out (calib split) prompts, the distribution SEDAC runs on.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sedac.builder import calibration as cal
from sedac.builder import exit_training as et
from sedac.builder import ghost_kv as gk
from sedac.config import SEDAC_WEIGHTS_FILE, WEIGHT_ONLY, EngineConfig, weight_format
from sedac.models.layers import DRAFT_PRECISIONS
from sedac.runtime.pass_costs import device_name, measure_pass_costs
from sedac.runtime.speculative import pass_cost

CALIBRATION_FILE = "sedac_calibration.json"
logger = logging.getLogger(__name__)


@dataclass
class SedacOptions:
    exit_layers: str = "auto"  # "auto" or comma-separated layer counts, e.g. "8,16,24"
    calib_data: str = "sharegpt"  # "sharegpt" or a text file (one document per line)
    calib_tokens: int = 8192  # generated tokens that calibrate thresholds and pick exits
    train_tokens: int = 65536  # teacher-forced tokens that train the exit heads
    epochs: int = 2
    adapter_rank: int = 256
    exit_vocab: int = 8192  # kept vocabulary of the exit heads
    seq_len: int = 512
    max_draft_len: int = 6
    ghost_tokens: int = 16384  # teacher-forced tokens that fit the Ghost KV predictor
    draft_precision: str = "auto"  # the draft copies: int8, int4, or "auto": the best predicted lossless speedup

    def layers(self, num_layers: int) -> list[int]:
        if self.exit_layers == "auto":
            return sorted({min(num_layers - 1, max(1, round(num_layers * f / 10))) for f in range(2, 10)})
        try:
            layers = sorted({int(x) for x in self.exit_layers.split(",")})
        except ValueError:
            raise ValueError(
                f"--exit-layers must be 'auto' or comma-separated integers, got {self.exit_layers!r}"
            ) from None
        if not layers or layers[0] < 1 or layers[-1] >= num_layers:
            raise ValueError(f"exit layers must be in [1, {num_layers - 1}], got {self.exit_layers!r}")
        return layers

    def drafts(self, base_precision: str) -> tuple[str, ...]:
        """The draft precisions to measure over a base (the one asked for, else every cheaper one)."""
        candidates = draft_candidates(base_precision)
        if not candidates:
            raise ValueError(
                f"--sedac needs a base with a cheaper copy for its drafter and precision exit: fp32, fp16, bf16 "
                f"(int8 or int4 drafts) or int8, w8a8 (int4 drafts); {base_precision} weights are already 4-5 bits"
            )
        if self.draft_precision == "auto":
            return candidates
        if self.draft_precision not in candidates:
            raise ValueError(
                f"--draft-precision {self.draft_precision} over a {base_precision} base: choose auto or one of "
                f"{', '.join(candidates)}"
            )
        return (self.draft_precision,)

    def validate(self) -> None:
        for name in (
            "calib_tokens",
            "train_tokens",
            "epochs",
            "adapter_rank",
            "exit_vocab",
            "seq_len",
            "max_draft_len",
            "ghost_tokens",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer")


def add_sedac(engine_dir: Path, opts: SedacOptions) -> dict:
    """Train and calibrate SEDAC into a built engine directory; returns the report section."""
    from sedac.runtime.llm import LLM  # the engine generates its own calibration answers

    opts.validate()
    engine_dir = Path(engine_dir)
    llm = LLM(str(engine_dir), device="cpu")
    runner, cfg, tok = llm.engine.runner, llm.engine.config, llm.engine.tokenizer
    model = runner.model
    layers = opts.layers(cfg.model.num_layers)
    seq_len = min(opts.seq_len, cfg.build.max_seq_len)
    train = et.collect_features(
        model,
        et.training_texts(tok, opts.calib_data, "train", seq_len),
        layers,
        opts.train_tokens,
        "teacher pass (train)",
    )
    answers = list(_own_answers(llm, opts, seq_len))
    calib = et.collect_features(model, answers, layers, opts.calib_tokens, "teacher pass (calib)")
    vocab = et.choose_vocab(train.argmax, opts.exit_vocab, cfg.model.eos_token_ids)
    heads, entropy, agree = {}, {}, {}
    for layer in layers:
        heads[layer] = et.train_exit_head(model, layer, train, vocab, opts.adapter_rank, opts.epochs)
        entropy[layer], agree[layer] = et.evaluate_exit_head(heads[layer], calib.hidden[layer], calib.argmax)
    drafters = {
        precision: _measure_drafter(runner, precision, answers, calib.argmax, opts.max_draft_len)
        for precision in opts.drafts(cfg.build.precision)
    }
    best = max(drafters, key=lambda p: drafters[p].lossless["predicted_lossless_speedup"])
    if best != list(drafters)[-1]:  # the copies measured last are the ones loaded
        runner.make_draft_copies(best)
    drafter = drafters[best]
    if drafter.lossless["predicted_lossless_speedup"] <= 1:
        logger.warning(
            "SEDAC: no draft copy cheaper than the %s weights pays on this machine (best: %s, predicted lossless "
            "%.2fx): lossless mode will decode without drafts", cfg.build.precision, best,
            drafter.lossless["predicted_lossless_speedup"],
        )  # fmt: skip
    costs = {**cal.cost_units(cfg.model, opts.adapter_rank, len(vocab)), **drafter.costs}
    learn = cal.document_split(calib.documents)
    section = _choose(layers, entropy, agree, costs, calib.documents, learn)
    section.update(drafter.lossless, draft_precision=best, draft_candidates=_candidates_report(drafters))
    section.update(
        _calibrate_precision_exit(
            drafter.uncertainty, drafter.agree, costs, section["predicted_lossy_cost_at_0.99"], calib.documents, learn
        )
    )
    section["calibration_split"] = _split_report(calib.documents, learn)
    lossy = section["lossy_layers"][0]
    ghost = gk.fit_ghost_kv(model, et.training_texts(tok, opts.calib_data, "train", seq_len), lossy, opts.ghost_tokens)
    section["ghost_kv_error"] = gk.kv_errors(
        model, et.training_texts(tok, opts.calib_data, "calib", seq_len), lossy, ghost, opts.calib_tokens
    )
    section.update(
        adapter_rank=opts.adapter_rank,
        kept_vocab=len(vocab),
        costs=costs,
        costs_device=device_name(runner.device),
        vocab_coverage=float(torch.isin(calib.argmax, vocab).float().mean()),
        options=asdict(opts),
        calib_positions=len(calib.argmax),
        train_positions=len(train.argmax),
    )
    _save(engine_dir, cfg, heads, ghost, section)
    return {
        k: section[k]
        for k in (
            "exit_layers",
            "draft_precision",
            "draft_candidates",
            "draft_len",
            "draft_agreement",
            "lossy_exit",
            "lossy_layers",
            "alpha",
            "predicted_lossless_speedup",
            "predicted_lossy_cost_at_0.99",
            "predicted_precision_lossy_cost_at_0.99",
            "vocab_coverage",
            "ghost_kv_error",
            "calibration_split",
        )
    }


def _own_answers(llm, opts: SedacOptions, seq_len: int):
    """(prompt + greedy answer, len(prompt) - 1): the positions that predict the answer's tokens."""
    from sedac.builder.datasets import sharegpt_prompts
    from sedac.runtime.sampling_params import SamplingParams

    max_tokens = min(128, seq_len // 2)
    count = -(-opts.calib_tokens // max_tokens) + 8
    if opts.calib_data == "sharegpt":
        prompts = sharegpt_prompts(llm.engine.tokenizer, "calib", count, seq_len - max_tokens)
    else:
        prompts = [
            ids[: seq_len - max_tokens]
            for ids, _ in itertools.islice(
                et.training_texts(llm.engine.tokenizer, opts.calib_data, "calib", seq_len), count
            )
        ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=True)
    for prompt, out in zip(prompts, outs):
        yield prompt + list(out.outputs[0].token_ids), len(prompt) - 1


def _split_report(documents: torch.Tensor, learn: torch.Tensor) -> dict:
    return {
        "by": "document",
        "learn_documents": int(documents[learn].unique().numel()),
        "test_documents": int(documents[~learn].unique().numel()),
        "test_tokens": int((~learn).sum()),
        "epsilon": 0.05,
        "test": "one-sided exact binomial on the test documents' tokens",
    }


def _choose(layers, entropy, agree, costs, documents, learn) -> dict:
    alpha = {layer: float(agree[layer].float().mean()) for layer in layers}
    lossy_cost, lossy_layer = _choose_lossy(layers, entropy, agree, costs, documents, learn)
    levels, curves, _ = _calibrate_levels(entropy[lossy_layer], agree[lossy_layer], learn)
    per_layer = {
        str(l): {
            "alpha": alpha[l],
            "entropy_quantiles": entropy[l].quantile(torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist(),
        }
        for l in layers
    }
    return {
        "exit_layers": layers,
        "alpha": alpha,
        "lossy_layers": [lossy_layer],
        "predicted_lossy_cost_at_0.99": lossy_cost / (costs["layers"] + costs["lm_head"]),
        "thresholds": levels,
        "default_agreement": 0.99,
        "curves": curves,
        "per_layer": per_layer,
    }


def draft_candidates(base_precision: str) -> tuple[str, ...]:
    """The draft precisions cheaper than an engine's base (DRAFT_PRECISIONS, cheapest last); none for
    int4 and gguf engines, whose weights are already 4 to 5 bits."""
    base_precision = weight_format(base_precision)
    if base_precision not in WEIGHT_ONLY:
        return DRAFT_PRECISIONS
    return DRAFT_PRECISIONS[DRAFT_PRECISIONS.index(base_precision) + 1 :] if base_precision in DRAFT_PRECISIONS else ()


@dataclass
class DrafterMeasure:
    """One candidate draft copy, measured on the build machine and the calibration answers."""

    costs: dict  # {"full", "draft"}: [fixed, per_row] (sedac.runtime.pass_costs)
    uncertainty: torch.Tensor  # 1 - top-2 margin of the draft's distribution, per calibration token
    agree: torch.Tensor  # its argmax is the full model's
    lossless: dict  # _choose_lossless: draft length, gate, predicted speedup


def _measure_drafter(runner, precision: str, answers, full_argmax: torch.Tensor, max_draft_len: int) -> DrafterMeasure:
    runner.make_draft_copies(precision)
    costs = measure_pass_costs(runner)
    entropy, uncertainty, argmax = _draft_predictions(runner.model, answers, len(full_argmax))
    agree = argmax == full_argmax
    return DrafterMeasure(costs, uncertainty, agree, _choose_lossless(entropy, agree, costs, max_draft_len))


def _candidates_report(drafters: dict) -> dict:
    return {
        precision: {
            "draft_pass_cost": pass_cost(d.costs, "draft", 1),
            "draft_agreement": d.lossless["draft_agreement"],
            "predicted_lossless_speedup": d.lossless["predicted_lossless_speedup"],
        }
        for precision, d in drafters.items()
    }


def _choose_lossless(entropy: torch.Tensor, agree: torch.Tensor, costs: dict, max_draft_len: int) -> dict:
    """A drafter's entropy gate and draft length with the best replayed speedup, from its
    teacher-forced predictions on the calibration answers (the positions calib features hold)."""
    gates = [float("inf")] + entropy.quantile(torch.linspace(0.5, 0.95, 10)).tolist()
    speed, k, gate = max(
        (cal.lossless_speedup(entropy, agree, k, g, costs), k, g) for k in range(1, max_draft_len + 1) for g in gates
    )
    return {
        "draft_len": k,
        "draft_max_entropy": gate if gate != float("inf") else 1e9,
        "draft_agreement": float(agree.float().mean()),
        "predicted_lossless_speedup": speed,
    }


def _calibrate_precision_exit(
    uncertainty: torch.Tensor,
    agree: torch.Tensor,
    costs: dict,
    depth_cost: float,
    documents: torch.Tensor,
    learn: torch.Tensor,
) -> dict:
    """Lossy mode's precision exit: a token keeps its draft pass's token (and K/V) when that distribution
    is confident, 1 - (p1 - p2) <= the threshold, else runs the full pass too. The top-2 margin, not the
    entropy, is the signal: quantization noise flips near-ties (on SmolLM2's int8 copy it let ~95% of
    tokens exit at 1% risk where entropy let ~73%). Thresholds per agreement level by Learn-then-Test;
    the lossy exit is whichever of the precision and the depth exit the cost model predicts cheaper at 0.99 (both
    predictions from the learn half alone). A token's cost: its draft pass, the fixed cost of a full pass
    if it stays, and one full-pass row either way (an exit's row runs with the next stay, as at run time:
    sedac.runtime.early_exit.precision_exit_pays)."""
    thresholds, curves, exit_fraction = _calibrate_levels(uncertainty, agree, learn)
    exits = _learn_half_exits(uncertainty, agree, documents, learn)
    fixed, per_row = costs["full"]
    cost = pass_cost(costs, "draft", 1) + (1 - float((exits == 0).float().mean())) * fixed + per_row
    return {
        "precision_thresholds": thresholds,
        "precision_curves": curves,
        "precision_exit_fraction": exit_fraction,
        "predicted_precision_lossy_cost_at_0.99": cost,
        "lossy_exit": "precision" if cost < depth_cost else "depth",
    }


def _calibrate_levels(score: torch.Tensor, agree: torch.Tensor, learn: torch.Tensor) -> tuple[dict, dict, dict]:
    """One exit's Learn-then-Test thresholds (a token exits where score <= threshold) at every
    agreement level -> ({level: thresholds}, {level: curve}, {level: share of the learn half's tokens
    that exit}: what choices may use)."""
    thresholds, curves, exit_fraction = {}, {}, {}
    for level in cal.AGREEMENT_LEVELS:
        ltt = cal.learn_then_test([score], [agree], delta=round(1 - level, 6), learn=learn)
        where, _ = cal.cascade(ltt["thresholds"], [score[learn]], [agree[learn]])
        thresholds[str(level)], curves[str(level)] = ltt["thresholds"], ltt["curve"]
        exit_fraction[str(level)] = float((where == 0).float().mean())
    return thresholds, curves, exit_fraction


@torch.inference_mode()
def _draft_predictions(model, answers, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, 1 - top-2 margin, argmax) of the draft copies' next-token distribution at the answers' positions."""
    entropy, uncertainty, argmax, total = [], [], [], 0
    for ids, first in answers:
        if len(ids) - first < 2 or total >= num_tokens:  # the documents collect_features kept
            continue
        _, final = et.teacher_pass(model, ids, [], draft=True)
        logits = model.logits(final[first:], draft=True).float()
        entropy.append(torch.ops.sedac.entropy(logits))
        uncertainty.append(1 - torch.ops.sedac.margin(logits))
        argmax.append(logits.argmax(-1))
        total += len(logits)
    return tuple(torch.cat(x)[:num_tokens] for x in (entropy, uncertainty, argmax))


def _choose_lossy(layers, entropy, agree, costs, documents, learn):
    """(cost, layer): the exit layer with the lowest calibrated cost at agreement 0.99, judged on the learn
    half alone: the test half stays unseen."""

    def cost(layer):
        return cal.lossy_cost(_learn_half_exits(entropy[layer], agree[layer], documents, learn), [layer], costs)

    return min((cost(layer), layer) for layer in layers)


def _learn_half_exits(score, agree, documents, learn, delta: float = 0.01) -> torch.Tensor:
    """Where the learn half's tokens would exit at risk delta, by a Learn-then-Test inside the learn half
    (its documents split again): what choices between exits are judged on."""
    inner = cal.document_split(documents[learn] // 2)  # learn documents are the even ones
    h, a = score[learn], agree[learn]
    ltt = cal.learn_then_test([h], [a], delta=delta, learn=inner)
    return cal.cascade(ltt["thresholds"], [h], [a])[0]


def _save(engine_dir: Path, cfg: EngineConfig, heads: dict, ghost: tuple, section: dict) -> None:
    tensors = {
        f"exit.{layer}.{name}": t.detach().clone().contiguous()
        for layer, head in heads.items()
        for name, t in head.state_dict().items()
    }
    tensors["ghost_kv.weight"], tensors["ghost_kv.bias"] = ghost  # predictor from the lossy exit layer
    save_file(tensors, str(engine_dir / SEDAC_WEIGHTS_FILE), metadata={"format": "pt"})
    curves = {k: section.pop(k) for k in ("curves", "precision_curves", "per_layer")}
    (engine_dir / CALIBRATION_FILE).write_text(json.dumps({**curves, "alpha": section["alpha"]}, indent=2))
    cfg.sedac = section
    cfg.save(engine_dir)
