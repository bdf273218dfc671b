"""Work items shared across the processes of a ``torchrun`` launch (one process: a no-op).

``torchrun --nproc_per_node N -m sketchwalk eval ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. `session` joins them into one process group
(gloo on the CPU, nccl on CUDA with one GPU per rank, ``cuda:LOCAL_RANK``); the commands then
deal items out round-robin (`shard`), run one round at a time, and `all_gather` each round's
results (or the error a rank met); rank 0 alone writes files. Rank 0 alone reads a result file
to resume, and `broadcast` tells the others what is done (or which error to raise, `on_main`),
so every rank stops with the same error instead of waiting on a collective forever.

Without the torchrun environment (or with ``WORLD_SIZE=1``) every function works on the one
process: rank 0 of a world of 1, nothing is sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

__all__ = [
    "World",
    "all_gather",
    "broadcast",
    "device_for",
    "map_rounds",
    "on_main",
    "requested_world_size",
    "session",
    "shard",
    "world",
]

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def requested_world_size() -> int:
    """The process count a torchrun launch asks for (``WORLD_SIZE``; 1 without torchrun),
    known before `session` joins the process group."""
    return max(1, _env_int("WORLD_SIZE", 1))


def world() -> World:
    """This process's place: from the joined process group, else a world of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


@contextlib.contextmanager
def session(device: str | None = "auto") -> Iterator[World]:
    """Join the torchrun process group for the body of a command, and leave it after.

    Args:
        device: the command's ``--device``; CUDA (``auto`` with CUDA present, or ``cuda``)
            picks nccl and ``cuda:LOCAL_RANK``, otherwise gloo.

    Yields:
        The `World`. A world of one (no torchrun environment) starts no process group.
    """
    import torch.distributed as dist

    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 or not dist.is_available() or dist.is_initialized():
        yield world()
        return
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = str(device) != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    finished = False
    try:
        yield world()
        finished = True
    finally:
        if finished:
            # leave together: rank 0 still writes the results after the last collective, and a
            # rank that left the group and exited meanwhile was once seen to abort at exit
            # (gloo, loaded 2-core machine). After an error the ranks may be in different
            # places, so they leave at once; a barrier that fails because another rank has
            # failed (and reports it) does not hide this rank's success
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # free the process group while the interpreter is whole


def device_for(name: str | torch.device | None, w: World) -> str | torch.device | None:
    """``--device`` for this rank: CUDA means this rank's GPU (``cuda:LOCAL_RANK``)."""
    if not w.distributed or name is None or str(name) == "cpu":
        return name
    if str(name) in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", w.local_rank)
    return name


def shard(items: Sequence[T], w: World) -> list[list[T | None]]:
    """Deal ``items`` out round-robin in rounds of ``world_size``.

    Returns one list per round; entry ``w.rank`` of a round is this rank's item (None when the
    last round has fewer items than ranks). Item ``j`` goes to rank ``j % world_size`` in round
    ``j // world_size``, so gathering the rounds in order restores the order of ``items``.
    """
    n = w.world_size
    rounds = []
    for start in range(0, len(items), n):
        chunk: list[T | None] = list(items[start : start + n])
        rounds.append(chunk + [None] * (n - len(chunk)))
    return rounds


def all_gather(value: T, w: World) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (so that an error one
    rank met can stop them all)."""
    if not w.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * w.world_size
    dist.all_gather_object(out, value)
    return out


def map_rounds(items: Sequence[T], fn: Callable[[T], R], w: World) -> Iterator[list[R]]:
    """``fn`` of every item, the items dealt out over the ranks (`shard`).

    Yields, on every rank, each round's results in the order of ``items`` (a round holds up
    to ``world_size`` items, one per rank). When ``fn`` raises on some rank, every rank gets
    the results that come before the failed item in the round (what one process would have
    finished), then that exception; in one process it propagates at once.
    """
    for round_items in shard(items, w):
        item = round_items[w.rank]
        outcome: Any = _NOTHING
        if item is not None:
            try:
                outcome = fn(item)
            except Exception as exc:
                if not w.distributed:
                    raise
                outcome = _Failed(exc)
        gathered = all_gather(outcome, w)
        first = next((r for r, e in enumerate(gathered) if isinstance(e, _Failed)), None)
        if first is None:
            yield [entry for entry in gathered if not isinstance(entry, _Nothing)]
            continue
        yield [entry for entry in gathered[:first] if not isinstance(entry, _Nothing)]
        # the rank that failed raises its own exception (with its traceback)
        raise (outcome if first == w.rank else gathered[first]).error


class _Nothing:
    """What a rank without an item in the last round sends (its result may be None)."""


_NOTHING = _Nothing()


class _Failed:
    """An exception on its way to the other ranks. It travels as its class, args and
    attributes and is rebuilt without calling ``__init__``: many exceptions take other
    arguments than the ``args`` pickle would call them with."""

    def __init__(self, error: Exception):
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        e = self.error
        return _rebuild_failed, (type(e), e.args, dict(vars(e)))


def _rebuild_failed(cls: type[Exception], args: tuple[Any, ...], state: dict) -> _Failed:
    error = cls.__new__(cls)
    error.args = args
    vars(error).update(state)
    return _Failed(error)


def broadcast(value: T, w: World) -> T:
    """Rank 0's ``value`` (picklable) on every rank."""
    if not w.distributed:
        return value
    import torch.distributed as dist

    box = [value if w.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], w: World) -> T | None:
    """Run ``fn`` on rank 0 only; its result there (None elsewhere). An exception it raises is
    raised on every rank, so all stop with the same message."""
    result: T | None = None
    failed: _Failed | None = None
    if w.is_main:
        try:
            result = fn()
        except Exception as exc:  # raised below, on every rank
            if not w.distributed:
                raise
            failed = _Failed(exc)
    sent = broadcast(failed, w)
    if sent is not None:
        raise (failed if w.is_main else sent).error
    return result
