"""Looking inside the model: `trace` (every activation of a forward pass, the logit lens, the next tokens)
and `viz` (its pictures, with the optional matplotlib extra)."""
