"""`mlx-gpt2 serve`: an OpenAI-compatible server over continuous batching (the `server` extra).

protocol (request bodies, checked) -> service (the model, its limits, tokenizing, queueing) -> scheduler
(the model thread, stepping a `generation.continuous.ContinuousBatch`) -> runs (events -> OpenAI's objects)
-> routes and app (FastAPI, SSE, errors).
"""
