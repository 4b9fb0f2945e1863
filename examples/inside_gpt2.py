"""Inside GPT-2: the embeddings, one block's attention heads, the residual stream, the next token, and
what changes when you intervene: ablating a head, patching a clean run into a corrupted one, saliency.

The figures of the classic GPT-2 walk-throughs, computed from a real checkpoint with mlx-gpt2's public
API, printed as shapes and numbers and saved as pictures (needs matplotlib: pip install 'mlx-gpt2[viz]'),
plus the explorer page (explorer.html) with all of it to click through.

    python examples/inside_gpt2.py gpt2                     # a Hub repo id (downloaded once)
    python examples/inside_gpt2.py path/to/model            # any GPT-2 directory, Hub-format or converted
    python examples/inside_gpt2.py gpt2 pictures/           # where the PNGs go (default: inside_gpt2/)
"""

import argparse
import sys
from pathlib import Path

from mlx_gpt2 import UserError, load
from mlx_gpt2.analysis import (
    Ablation, ablate, explorer_data, logit_lens, next_tokens, patch, render_page, run_with_hooks, saliency, trace, viz,
)

TEXT = "The animal didn't cross the street because it was too tired"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def main() -> None:
    parser = argparse.ArgumentParser(description="The figures of the GPT-2 walk-throughs, from a real checkpoint.")
    parser.add_argument("model", help="Hub repo id or GPT-2 directory")
    parser.add_argument("out", nargs="?", type=Path, default=Path("inside_gpt2"), help="where the pictures go")
    args = parser.parse_args()
    model_name, out, text = args.model, args.out, TEXT
    viz.require_matplotlib()
    out.mkdir(parents=True, exist_ok=True)

    def save(figure, name):
        print(f"   picture: {viz.save_png(figure, out / name)}")

    model, tokenizer = load(model_name)
    c = model.config
    t = trace(model, tokenizer, text)
    L = len(t.tokens)

    print(f"1. Embeddings of {model_name}")
    print(f"   token embeddings wte: {c.vocab_size} × {c.n_embd}, one row per vocabulary entry")
    print(f"   position embeddings wpe: {c.n_positions} × {c.n_embd}, one row per position in the window")
    print(f"   {text!r} is {L} tokens: {t.tokens}")
    print(f"   their rows {t.token_embeddings.shape} + positions {t.position_embeddings.shape}"
          f" = the input of block 0, {t.residual_stream[0].shape}")
    save(viz.embeddings_figure(t), "embeddings.png")

    print("\n2. Masked self-attention, in each of the", c.n_layer, "blocks")
    print(f"   ln_1, then c_attn: {c.n_embd} → {3 * c.n_embd} (q, k and v, {c.n_embd} each)"
          f" → {c.n_head} heads × {c.head_dim}; t.q is {t.q.shape} [layer, head, position, head_dim]")
    print(f"   per head, q·kᵀ × {model.h[0].attn.scale:.3f} (1/√{c.head_dim}) gives {L} × {L} scores; the causal mask"
          f" hides later tokens and a softmax turns each row into probabilities: t.attentions is {t.attentions.shape}")
    print(f"   probabilities × v: {L} × {c.head_dim} per head; {c.n_head} heads concatenated back to {L} × {c.n_embd};"
          f" c_proj {c.n_embd} → {c.n_embd}, added to the residual stream")
    print(f"   then ln_2 and the MLP: {c.n_embd} → {c.ffn_dim} → {c.n_embd}, added again")
    it, animal = t.tokens.index(" it"), t.tokens.index(" animal")
    # Which head of which layer sends the most of " it"'s attention to " animal"?
    layer, head = divmod(int(t.attentions[:, :, it, animal].argmax()), c.n_head)
    print(f"   ' it' (position {it}) attends to ' animal' most in layer {layer}, head {head}: "
          f"{t.attentions[layer, head, it, animal]:.0%} of its attention")
    for key in t.attentions[layer, head, it].argsort()[::-1][:3]:
        print(f"      {t.tokens[key]!r:>10}  {t.attentions[layer, head, it, key]:.2f}")
    save(viz.attention_figure(t, layer=layer, head=head), "attention_head.png")
    save(viz.attention_figure(t, layer=layer), "attention_heads.png")

    print(f"\n3. The residual stream: {c.n_layer} blocks, then ln_f and the head ({c.n_embd} → {c.vocab_size})")
    print(f"   t.hidden_states is {t.hidden_states.shape}: the embeddings, then each block's output"
          f" (the last one after ln_f, as transformers returns it)")
    lens = logit_lens(model, tokenizer, t, top=1)
    print(f"   logit lens at {t.tokens[-1]!r}: the model's guess for the next token after each number of blocks")
    for depth in range(c.n_layer + 1):
        label = "embeddings" if depth == 0 else f"after block {depth - 1}"
        print(f"      {label:>14}  {lens.top_tokens[depth][-1][0]!r:>14}  {lens.top_probs[depth, -1, 0]:.2f}")
    save(viz.logit_lens_figure(lens), "logit_lens.png")

    print(f"\n4. The next token after {text!r}")
    candidates = next_tokens(model, tokenizer, text, top=5)
    for candidate in candidates:
        print(f"      {candidate.token!r:>14}  {candidate.prob:.3f}")
    save(viz.next_tokens_figure(candidates, t.tokens), "next_token.png")
    interventions(model, tokenizer, t, (layer, head), save)
    page = out / "explorer.html"
    page.write_text(render_page(explorer_data(model, tokenizer, text, name=model_name)), encoding="utf-8")
    print(f"\n8. Everything above, to click through offline: {page} ({page.stat().st_size / 1e6:.2f} MB)")


def interventions(model, tokenizer, t, it_head, save) -> None:
    """5-7: knock out the head that links ' it' to ' animal'; patch; saliency."""
    import mlx.core as mx

    def probs(logits):
        return mx.softmax(logits[-1].astype(mx.float32), axis=-1)

    layer, head = it_head
    clean = probs(run_with_hooks(model, t.token_ids, {}))
    top = int(mx.argmax(clean))
    ablated = probs(ablate(model, t.token_ids, Ablation(heads=((layer, head),), method="mean")))
    print(f"\n5. Ablation: head {layer}.{head}'s output replaced by its mean over the text")
    print(f"   P({tokenizer.decode([top])!r}) after the text: {clean[top].item():.3f} -> {ablated[top].item():.3f}")

    ids = tokenizer.encode(CLEAN), tokenizer.encode(CORRUPTED)
    answer, wrong = tokenizer.encode(" Mary")[0], tokenizer.encode(" John")[0]
    print(f"\n6. Activation patching: {CLEAN!r} (answer ' Mary') vs {CORRUPTED!r} (' John')")
    if len(ids[0]) != len(ids[1]):
        print("   (this tokenizer splits the two texts differently; skipped)")
    else:
        result = patch(model, *ids, answer=answer, wrong=wrong)
        print(f"   logit difference Mary - John: clean {result.clean:.2f}, corrupted {result.corrupted:.2f}")
        layer_best, pos_best = divmod(int(abs(result.recovered).argmax()), len(ids[0]))
        print(f"   patching the residual stream of layer {layer_best} at {tokenizer.decode([ids[0][pos_best]])!r} "
              f"recovers {result.recovered[layer_best, pos_best]:.0%} of it")
        columns = [tokenizer.decode([i]) for i in ids[0]]
        save(viz.patching_figure(result.recovered, columns, xlabel="position patched", title="patching resid_pre"), "patching.png")

    s = saliency(model, t.token_ids, top, method="integrated_gradients", steps=16)
    print(f"\n7. Saliency (integrated gradients) of {tokenizer.decode([top])!r} over the input tokens")
    for p in s.shares.argsort()[::-1][:3]:
        print(f"      {t.tokens[p]!r:>10}  {s.shares[p]:.2f}")
    save(viz.saliency_figure(t.tokens, s.shares, f"integrated gradients for {tokenizer.decode([top])!r}"), "saliency.png")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
