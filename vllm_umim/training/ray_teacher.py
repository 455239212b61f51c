"""Teacher caching over a Ray cluster: the frozen model's top-k logits for many shards at once.

Caching the teacher is the expensive part of training and embarrassingly parallel: each shard of
windows is independent. ``compute_shards_on_ray`` starts ``workers`` Ray actors (one CPU each),
sends each the frozen model and rules once through Ray's object store (no shared filesystem and no
model download on the worker nodes; they need this package and its dependencies installed), and
hands out the missing shards. Each actor runs ``teacher_shards.compute_shard``, the function the
local path runs, and returns the shard's tensors; ``build_cache`` writes them under the same names
with the same content as the local path (up to float reduction order), so an interrupted run
resumes with either path. The student's training stays torch DDP (``torchrun``).
"""

from __future__ import annotations

from collections.abc import Iterator

import ray
import torch
from ray.util import ActorPool

from vllm_umim.training.teacher_shards import compute_shard


@ray.remote(num_cpus=1)
class TeacherWorker:
    def __init__(self, model, rules, k: int, batch_size: int, threads: int):
        torch.set_num_threads(threads)
        self.model, self.rules, self.k, self.batch_size = model.eval(), rules, k, batch_size

    def shard(self, shard: int, lo: int, hi: int, windows: list[list[int]]):
        return shard, lo, hi, compute_shard(self.model, self.rules, windows, self.k, self.batch_size)


def compute_shards_on_ray(model, rules, windows: list[list[int]], todo: list[tuple[int, int, int]], k: int,
                          batch_size: int, workers: int, address: str | None = None,
                          threads: int = 1) -> Iterator[tuple[int, int, int, tuple[dict, int]]]:
    """Yield ``(shard, lo, hi, (tensors, raw_tokens))`` for every ``(shard, lo, hi)`` in ``todo``,
    in the order they finish. Connects to the cluster at ``address`` (default: what ``ray.init()``
    finds: ``RAY_ADDRESS`` or a ``ray start`` cluster on this node, else a new local instance) unless
    this process is connected already; a Ray instance it started itself is shut down at the end."""
    if not todo:
        return
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address)
    actors = []
    try:
        model_ref, rules_ref = ray.put(model), ray.put(rules)
        actors = [TeacherWorker.remote(model_ref, rules_ref, k, batch_size, threads) for _ in range(min(workers, len(todo)))]
        pool = ActorPool(actors)
        yield from pool.map_unordered(lambda actor, r: actor.shard.remote(*r, windows[r[1] : r[2]]), todo)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
