"""mlx-gpt2's benchmarks: side by side with mlx-lm, mlx_lm.server and transformers (see RESULTS.md).

`python -m benchmarks` (or `mlx-gpt2 bench` in a clone) runs `bench.py`; the other scripts here measure one
thing each and say how to run them at their top.
"""
