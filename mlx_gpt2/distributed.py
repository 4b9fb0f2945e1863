"""Data parallelism over MLX's own distributed engine (`mx.distributed`), as `mlx.launch` starts it.

`mlx.launch -n 2 -- mlx-gpt2 lora ...` (or `--hostfile hosts.json` for several Macs) runs one process per
rank; `World.current()` is this process's place in them (rank 0 of 1 when nothing launched it). Each rank
computes its share of every batch, and one `all_sum` per step adds the shares up: every gradient array is
flattened into one buffer first, so a step sends one message (a rank whose peer died while many
all-reduces were pending hung for good with MLX 0.32; with one, it fails at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import Any, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from .errors import UserError


class PeerLost(UserError):
    """Another rank stopped (killed, crashed, its machine gone): this one cannot go on."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's rank among `size` processes, and the group that connects them (None alone)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @classmethod
    def current(cls) -> World:
        """The world `mlx.launch` made (it sets MLX_RANK for every process), or a world of one."""
        if "MLX_RANK" not in os.environ or not mx.distributed.is_available():
            return cls()
        group = mx.distributed.init()
        return cls(group.rank(), group.size(), group) if group.size() > 1 else cls()

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes metrics and saves."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's rows of a batch of `n` rows (n divisible by the world size: checked at start)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def split(self, n: int) -> range:
        """This rank's items of `n` items that need not divide evenly (validation batches, windows)."""
        return range(self.rank, n, self.size)

    def sum(self, tree: Any) -> Any:
        """The elementwise sum over ranks of a tree of arrays (each rank's own tree alone), evaluated.

        One flattened buffer, one all_sum; float32 on the wire whatever the arrays' dtypes, so sums of
        bfloat16 gradients lose nothing in transit.
        """
        if self.size == 1:
            return tree
        leaves = tree_flatten(tree)
        flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])
        try:
            total = mx.distributed.all_sum(flat, group=self.group)
            mx.eval(total)
        except RuntimeError as failure:
            raise PeerLost(f"rank {self.rank}: another process of this run stopped ({str(failure).splitlines()[0][:120]}); "
                           "the run ends here: rerun it (with --resume if a checkpoint was saved)") from None  # fmt: skip
        pieces, start = [], 0
        for _, v in leaves:  # cut the sum back into the arrays, in tree_flatten's order (tree_map's too)
            pieces.append(total[start : start + v.size].reshape(v.shape).astype(v.dtype))
            start += v.size
        parts = iter(pieces)
        return tree_map(lambda _: next(parts), tree)

    @contextlib.contextmanager
    def stopped_by_the_launcher(self) -> Iterator[None]:
        """When one process of a run dies, `mlx.launch` stops the others with SIGTERM: say so in one line and
        exit 1, even while this process is blocked inside MLX waiting for the dead peer.

        A Python signal handler runs only between bytecodes, never during a blocking collective, so the
        signal's wakeup byte goes to a pipe that a watcher thread reads. Files are written atomically
        (a temporary name, then a rename), so the last whole checkpoint stays as it was.
        """
        if self.size == 1 or threading.current_thread() is not threading.main_thread():
            yield
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        previous = signal.signal(signal.SIGTERM, lambda *_: None)  # the byte on the pipe does the work
        old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

        def watch() -> None:
            if os.read(read, 1):
                print(f"error: rank {self.rank}: this run was stopped (another of its processes ended, or the "
                      "launcher was stopped); its last checkpoint is kept: rerun with --resume", file=sys.stderr,
                      flush=True)  # fmt: skip
                os._exit(1)

        threading.Thread(target=watch, name="mlx-gpt2-sigterm", daemon=True).start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            signal.signal(signal.SIGTERM, previous)

    def check_batch(self, batch_size: int, what: str = "--batch-size") -> None:
        if batch_size % self.size:
            raise UserError(f"{what} {batch_size} does not divide among {self.size} processes; use a multiple of "
                            f"{self.size} (it is the global batch, split across the processes)")  # fmt: skip
