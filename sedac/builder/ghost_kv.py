"""Ghost KV: a trained predictor of the deeper layers' K/V for tokens that exit early (lossy mode).

A token that exits after E layers has no K/V in layers [E, L), which later tokens attend to. CALM's
state propagation feeds the exit state h_E through each deeper layer's own K/V projection, as if that
layer's input were h_E. Ghost KV keeps that map as its prior and learns a correction per layer:

    kv_l(h_E) = rms(h_E) @ (W_prop_l + dW_l) + (b_prop_l + db_l)      (rms: sedac.runtime.early_exit.ghost_input)

with (dW, db) the ridge-regression fit of the residual (true kv_l - propagation) on teacher-forced
text. Closed form from normal equations accumulated in float64: deterministic, seconds on CPU, and
the ridge pulls toward propagation where data says little. All deeper layers stack into one
[hidden, layers x 2 x KV x D] matrix, so the runtime fills them with one `sedac::kv_predict` GEMV.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from sedac.builder.exit_training import teacher_pass
from sedac.runtime.early_exit import ghost_input, predicted_kv


@torch.inference_mode()
def fit_ghost_kv(model, documents, exit_layer: int, num_tokens: int, ridge: float = 1e-3):
    """-> (weight [hidden, n * 2 * KV * D], bias [n * 2 * KV * D]) for the n = L - E deeper layers."""
    deeper = list(range(exit_layer, model.cfg.num_layers))
    size = model.cfg.hidden_size + 1
    gram = torch.zeros(size, size, dtype=torch.float64)
    cross = {l: 0 for l in deeper}
    total, bar = 0, tqdm(total=num_tokens, desc=f"ghost KV (exit {exit_layer})", unit="tok")
    for ids, _ in documents:
        states, _ = teacher_pass(model, ids, deeper)
        x = _with_ones(ghost_input(model, states[exit_layer]))
        gram += x.T @ x
        propagated = predicted_kv(model, states[exit_layer], exit_layer, "propagate")
        for l, prop in zip(deeper, propagated):
            cross[l] = cross[l] + x.T @ (_true_kv(model, l, states[l]) - prop).double()
        total += len(ids)
        bar.update(len(ids))
        if total >= num_tokens:
            break
    bar.close()
    if total == 0:
        raise ValueError("ghost KV training data yielded no documents")
    reg = torch.eye(size, dtype=torch.float64) * (ridge * gram.diagonal()[:-1].mean())
    reg[-1, -1] = 0  # the bias is not shrunk
    weights, biases = [], []
    for l in deeper:
        delta = torch.linalg.solve(gram + reg, cross[l]).float()  # [hidden + 1, 2 * KV * D]
        prior_w, prior_b = _propagation_map(model, l)
        weights.append(prior_w + delta[:-1])
        biases.append(prior_b + delta[-1])
    return torch.cat(weights, dim=1).contiguous(), torch.cat(biases).contiguous()


@torch.inference_mode()
def kv_errors(model, documents, exit_layer: int, ghost, num_tokens: int) -> dict:
    """Relative L2 error of the deeper layers' K/V on held-out text: Ghost KV vs state propagation."""
    deeper = list(range(exit_layer, model.cfg.num_layers))
    err = {"ghost": 0.0, "propagate": 0.0}
    norm, total = 0.0, 0
    for ids, _ in documents:
        states, _ = teacher_pass(model, ids, deeper)
        predictions = {fill: predicted_kv(model, states[exit_layer], exit_layer, fill, ghost) for fill in err}
        for i, l in enumerate(deeper):
            truth = _true_kv(model, l, states[l])
            norm += float(truth.pow(2).sum())
            for fill, kvs in predictions.items():
                err[fill] += float((kvs[i] - truth).pow(2).sum())
        total += len(ids)
        if total >= num_tokens:
            break
    return {k: round((v / max(norm, 1e-30)) ** 0.5, 4) for k, v in err.items()}


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1).double()


def _true_kv(model, l: int, h_in: torch.Tensor) -> torch.Tensor:
    """Layer l's K/V for its real input states h_in."""
    layer = model.layers[l]
    return layer.kv_projection(layer.input_norm(h_in))


def _propagation_map(model, l: int):
    """State propagation as an affine map of ghost_input(h): (W [hidden, 2 * KV * D], b)."""
    layer = model.layers[l]
    gain = torch.diag(layer.input_norm.weight.float())
    basis = torch.cat([torch.zeros(1, gain.shape[0]), gain]).to(layer.input_norm.weight.dtype)  # 0, then e_i * g_i
    rows = layer.kv_projection(basis).float()
    return rows[1:] - rows[0], rows[0]
