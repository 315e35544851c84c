"""`sedac-build --sedac`: train exit heads, calibrate the lossy exits (depth and int8) and the
lossless drafter, and pick each by the cost model.

Training data: ShareGPT conversations (train split) under teacher forcing. Calibration data: the
model's own greedy answers to held-out (calib split) prompts, the distribution SEDAC runs on.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sedac.builder import calibration as cal
from sedac.builder import exit_training as et
from sedac.builder import ghost_kv as gk
from sedac.builder.pass_costs import measure_pass_costs
from sedac.config import SEDAC_WEIGHTS_FILE, EngineConfig
from sedac.runtime.speculative import pass_cost

CALIBRATION_FILE = "sedac_calibration.json"


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
    model, cfg, tok = llm.engine.runner.model, llm.engine.config, llm.engine.tokenizer
    model.quantize_int8()  # the lossless drafter, measured and calibrated below
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
    costs = {**cal.cost_units(cfg.model, opts.adapter_rank, len(vocab)), **measure_pass_costs(llm.engine.runner)}
    learn = cal.document_split(calib.documents)
    section = _choose(layers, entropy, agree, costs, calib.documents, learn)
    int8_entropy, int8_uncertainty, int8_argmax = _int8_predictions(model, answers, len(calib.argmax))
    int8_agree = int8_argmax == calib.argmax
    section.update(_choose_lossless(int8_entropy, int8_agree, costs, opts.max_draft_len))
    section.update(
        _calibrate_int8_exit(
            int8_uncertainty, int8_agree, costs, section["predicted_lossy_cost_at_0.99"], calib.documents, learn
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
            "draft_len",
            "draft_agreement",
            "lossy_exit",
            "lossy_layers",
            "alpha",
            "predicted_lossless_speedup",
            "predicted_lossy_cost_at_0.99",
            "predicted_int8_lossy_cost_at_0.99",
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


def _choose_lossless(entropy: torch.Tensor, agree: torch.Tensor, costs: dict, max_draft_len: int) -> dict:
    """The int8 drafter's entropy gate and draft length with the best replayed speedup, from its
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


def _calibrate_int8_exit(
    uncertainty: torch.Tensor,
    agree: torch.Tensor,
    costs: dict,
    depth_cost: float,
    documents: torch.Tensor,
    learn: torch.Tensor,
) -> dict:
    """Lossy mode's int8 exit: a token keeps its int8 pass's token (and K/V) when that distribution is
    confident, 1 - (p1 - p2) <= the threshold, else runs the full pass too. The top-2 margin, not the
    entropy, is the signal: quantization noise flips near-ties (on SmolLM2 it lets ~95% of tokens
    exit at 1% risk where entropy lets ~73%). Thresholds per agreement level by Learn-then-Test; the
    lossy exit is whichever of int8 and the depth exit the cost model predicts cheaper at 0.99 (both
    predictions from the learn half alone)."""
    thresholds, curves, exit_fraction = _calibrate_levels(uncertainty, agree, learn)
    exits = _learn_half_exits(uncertainty, agree, documents, learn)
    cost = pass_cost(costs, "int8", 1) + (1 - float((exits == 0).float().mean())) * pass_cost(costs, "full", 1)
    return {
        "int8_thresholds": thresholds,
        "int8_curves": curves,
        "int8_exit_fraction": exit_fraction,
        "predicted_int8_lossy_cost_at_0.99": cost,
        "lossy_exit": "int8" if cost < depth_cost else "depth",
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
def _int8_predictions(model, answers, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, 1 - top-2 margin, argmax) of the int8 model's next-token distribution at the answers' positions."""
    entropy, uncertainty, argmax, total = [], [], [], 0
    for ids, first in answers:
        if len(ids) - first < 2 or total >= num_tokens:  # the documents collect_features kept
            continue
        _, final = et.teacher_pass(model, ids, [], int8=True)
        logits = model.logits(final[first:], int8=True).float()
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
    curves = {k: section.pop(k) for k in ("curves", "int8_curves", "per_layer")}
    (engine_dir / CALIBRATION_FILE).write_text(json.dumps({**curves, "alpha": section["alpha"]}, indent=2))
    cfg.sedac = section
    cfg.save(engine_dir)
