"""Looking inside the model.

- `trace`: every activation of one forward pass, the logit lens, the next tokens; `viz`: their pictures
  (the optional matplotlib extra).
- `hooks`: `run_with_cache` / `run_with_hooks` at every named point of the forward pass, by the
  checkpoint's names (with the table to TransformerLens's).
- `interventions`: ablation of heads and neurons, activation patching, direct logit attribution.
- `saliency`: gradient x input and integrated gradients over the token embeddings.
- `neurons`: MLP activations, the most active neurons, NMF neuron factors.
- `explorer`: the self-contained HTML page of all of it.

The names below import their module on first use, so `import mlx_gpt2.analysis` stays light.
"""

from __future__ import annotations

from ..exports import install

_EXPORTS = {
    "ActivationCache": "hooks", "hook_names": "hooks", "run_with_cache": "hooks", "run_with_hooks": "hooks",
    "transformer_lens_name": "hooks",
    "Ablation": "interventions", "Attribution": "interventions", "Patching": "interventions", "ablate": "interventions",
    "direct_logit_attribution": "interventions", "patch": "interventions", "patch_heads": "interventions",
    "SALIENCY_METHODS": "saliency", "Saliency": "saliency", "saliency": "saliency",
    "NeuronFactors": "neurons", "neuron_activations": "neurons", "neuron_factors": "neurons", "top_neurons": "neurons",
    "explorer_data": "explorer", "render_page": "explorer",
    "Trace": "trace", "logit_lens": "trace", "next_tokens": "trace", "trace": "trace",
}  # fmt: skip
install(__name__, _EXPORTS)
