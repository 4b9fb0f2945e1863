"""TransformerLens on our test checkpoints, as the reference for hooks, ablation and patching.

TransformerLens 3.9 is built by hand from the transformers config (its from_pretrained would reach the
Hub), with every weight-processing option off, so its activations are the checkpoint's own numbers.
"""

from __future__ import annotations


def hooked_transformer(hf_model):
    """A HookedTransformer holding `hf_model`'s weights, unprocessed (no LN folding, no centering)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False, device="cpu", dtype=__import__("torch").float32,
    )
    model = HookedTransformer(cfg)  # token ids only: no tokenizer needed
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return model.eval()
