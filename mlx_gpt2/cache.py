"""The key/value cache: one per block, preallocated and grown in steps, never concatenated per token."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, `[batch, n_head, capacity, head_dim]`.

    `offset` is how many positions are filled. Writing a token is a slice update into the preallocated
    buffer; the buffer grows by `step` positions at a time (or to exactly `capacity` at once when the
    caller knows the final length), so decoding costs no copy of the whole history per token.
    """

    step = 256

    def __init__(self, capacity: int | None = None) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.capacity = capacity

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        batch, n_head, length, head_dim = keys.shape
        needed = self.offset + length
        if self.capacity and needed <= self.capacity:
            size = self.capacity  # the caller knows the final length: exactly that, no step's slack
        else:
            size = ((needed + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((batch, n_head, size, head_dim), keys.dtype)
        new_v = mx.zeros((batch, n_head, size, head_dim), values.dtype)
        if self.keys is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `[B, H, L, hd]` keys/values; return everything cached so far."""
        length = keys.shape[2]
        if self.keys is None or self.offset + length > self.keys.shape[2]:
            self._grow(keys, values)
        start, self.offset = self.offset, self.offset + length
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions now (one copy of the filled part), so decoding never grows.

        generate_step sizes the cache to the prompt for the prefill, when activations are largest, and
        reserves the room for the new tokens after it: the peak holds the prompt's keys, not all of them.
        """
        self.capacity = max(self.capacity or 0, capacity)
        if self.keys is not None and self.keys.shape[2] < self.capacity:
            self._grow(self.keys[..., :0, :], self.values[..., :0, :])  # nothing new: grows to capacity
            mx.eval(self.keys, self.values)  # one layer at a time, so old and new buffers never all coexist

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (speculative decoding rejects drafted tokens this way)."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        """The filled part of the cache, `[B, H, offset, hd]` each."""
        if self.keys is None:
            raise ValueError("the cache is empty")
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(n_layer: int, capacity: int | None = None) -> list[KVCache]:
    """One empty cache per block."""
    return [KVCache(capacity) for _ in range(n_layer)]
