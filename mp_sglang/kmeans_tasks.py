"""K-means problems as values, so that the index upkeep of many requests and layers runs as one batch.

Building or folding an index (reference.py) is written as a *steps* generator: it yields the
k-means problems it needs (`KMeansTask`, one per k-means block or hierarchy level), receives their
solutions, and finally returns the index. `run` drives one such generator with a solver;
`drive` runs many in lockstep and hands every round's problems to the solver at once. The plain
solver `solve_each` clusters task by task with `mp_sglang.clustering`; the batched solver
`mp_kernels.kmeans.solve_batched` runs a whole round as one set of Triton launches, which is what
makes the first decode step of a long batch cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from mp_sglang.clustering import cluster_means, lloyd, to_device

T = TypeVar("T")


@dataclass(frozen=True)
class KMeansTask:
    """Lloyd iterations over `points [H, n, d]` from `init [H, K, d]`, plus the member means of `values`.

    Empty clusters are re-seeded from `generator` between iterations (as `clustering.lloyd`);
    `weights [H, n]` weigh the points (the counts of child clusters at a coarser level).
    """

    points: torch.Tensor
    values: torch.Tensor
    init: torch.Tensor
    iters: int
    generator: torch.Generator
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class KMeansResult:
    """Key centroids `[H, K, d]`, value means `[H, K, d]` (0 for an empty cluster), total weight per
    cluster `[H, K]` and each point's cluster `[H, n]` int64, all on the points' device."""

    centroids: torch.Tensor
    value_means: torch.Tensor
    totals: torch.Tensor
    labels: torch.Tensor


Solver = Callable[[Sequence[KMeansTask]], list[KMeansResult]]
Steps = Generator[list[KMeansTask], list[KMeansResult], T]


def random_init_task(
    points: torch.Tensor,
    values: torch.Tensor,
    num_clusters: int,
    iters: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
) -> KMeansTask:
    """K-means from `num_clusters` distinct random points of each head (seeded, reproducible).

    Every head starts from the same random positions: heads are clustered independently, so each
    still starts from distinct random points of its own, and one draw per task (not per head)
    keeps a 64K-token build's host time off the first decode step (1,024 draws -> 128).
    """
    heads, n, dim = points.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}] for {n} points; got {num_clusters}")
    picks = to_device(torch.randperm(n, generator=generator)[:num_clusters], points.device)
    init = torch.gather(points, 1, picks.view(1, -1, 1).expand(heads, -1, dim))
    return KMeansTask(points, values, init, iters, generator, weights)


def solve_each(tasks: Sequence[KMeansTask]) -> list[KMeansResult]:
    """The reference solver: one task after another with `clustering.lloyd`."""
    results = []
    for task in tasks:
        centroids, labels = lloyd(task.points, task.init, task.iters, task.generator, task.weights)
        fallback = torch.zeros_like(task.values[:, :1]).expand(-1, centroids.shape[1], -1)
        value_means, totals = cluster_means(task.values, labels, centroids.shape[1], fallback, task.weights)
        results.append(KMeansResult(centroids, value_means, totals, labels))
    return results


def run(steps: Steps[T], solve: Solver = solve_each) -> T:
    """Drive one steps generator to its result."""
    return drive([steps], solve)[0]


def drive(all_steps: Sequence[Steps[T]], solve: Solver = solve_each) -> list[T]:
    """Run steps generators in lockstep; each round's tasks of all of them go to `solve` at once."""
    results: list[T | None] = [None] * len(all_steps)
    pending: dict[int, list[KMeansTask]] = {}

    def advance(i: int, answer: list[KMeansResult] | None) -> None:
        try:
            pending[i] = all_steps[i].send(answer)  # type: ignore[arg-type]
        except StopIteration as done:
            results[i] = done.value

    for i in range(len(all_steps)):
        advance(i, None)
    while pending:
        round_tasks, pending = pending, {}
        solved = solve([task for tasks in round_tasks.values() for task in tasks])
        first = 0
        for i, tasks in round_tasks.items():
            advance(i, solved[first : first + len(tasks)])
            first += len(tasks)
    return results  # type: ignore[return-value]
