"""MLP neurons: their activations per token, the most active ones per layer, and ECCO's neuron factors.

A neuron is one of the n_inner (4 x n_embd) outputs of a block's `mlp.act` (the GELU of `mlp.c_fc`).
`neuron_factors` finds a few patterns that explain a text's activations: a non-negative matrix
factorization (scikit-learn's NMF, the `analysis` extra) of the activations with negatives clipped to zero
(GELU's small negative tail carries little), as ECCO does: [L tokens, neurons] ~= W [L, k] x H [k, neurons].
Each factor is a group of neurons that fire together; W says how strongly each token shows it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..errors import UserError
from ..model import GPT2
from .hooks import as_batch, run_with_cache
from .trace import check_index


def neuron_activations(model: GPT2, tokens, layers: Sequence[int] | None = None) -> np.ndarray:
    """[len(layers), L, n_inner] float32: `mlp.act` of each layer (default: every layer) for one text."""
    layers = list(range(model.config.n_layer)) if layers is None else list(layers)
    for layer in layers:
        check_index("layer", layer, model.config.n_layer, "layers")
    batch = as_batch(model, tokens)
    if batch.shape[0] != 1:
        raise UserError("neuron activations take one text")
    _, cache = run_with_cache(model, batch, names=[f"h.{i}.mlp.act" for i in layers])
    return np.stack([cache.numpy(f"h.{i}.mlp.act")[0] for i in layers])


@dataclasses.dataclass(frozen=True)
class Neuron:
    layer: int
    neuron: int
    activation: float  # its largest activation over the text
    position: int  # where it is reached


def top_neurons(activations: np.ndarray, top: int = 10, layers: Sequence[int] | None = None) -> list[list[Neuron]]:
    """Per layer, the `top` neurons with the largest activation anywhere in the text, largest first."""
    n_layers, _, width = activations.shape
    if not 1 <= top <= width:
        raise UserError(f"top must be in 1-{width}, got {top}")
    layers = list(range(n_layers)) if layers is None else list(layers)
    out = []
    for layer, acts in zip(layers, activations):
        peak = acts.max(axis=0)  # [n_inner]
        best = np.argsort(-peak, kind="stable")[:top]
        out.append([Neuron(layer, int(n), float(peak[n]), int(acts[:, n].argmax())) for n in best])
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class NeuronFactors:
    token_weights: np.ndarray  # [L, k]: how strongly each token shows each factor
    neuron_weights: np.ndarray  # [k, neurons]: each factor's neurons (columns follow the activations')
    reconstruction_error: float  # Frobenius norm of relu(activations) - W H


def neuron_factors(activations: np.ndarray, factors: int = 5, *, seed: int = 0, max_iter: int = 500) -> NeuronFactors:
    """NMF of `activations` ([L, neurons], or [layers, L, neurons] with the layers side by side)."""
    try:
        from sklearn.decomposition import NMF
    except ImportError:
        raise UserError("neuron factors need scikit-learn: pip install 'mlx-gpt2[analysis]'") from None
    acts = activations if activations.ndim == 2 else np.concatenate(list(activations), axis=-1)
    if not 1 <= factors <= min(acts.shape):
        raise UserError(f"factors must be in 1-{min(acts.shape)} (at most the number of tokens), got {factors}")
    positive = np.maximum(acts, 0).astype(np.float64)
    nmf = NMF(n_components=factors, init="nndsvda", random_state=seed, max_iter=max_iter)
    token_weights = nmf.fit_transform(positive)
    return NeuronFactors(token_weights=token_weights, neuron_weights=nmf.components_,
                         reconstruction_error=float(nmf.reconstruction_err_))
