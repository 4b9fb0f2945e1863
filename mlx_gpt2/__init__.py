"""mlx-gpt2: GPT-2 in MLX."""
