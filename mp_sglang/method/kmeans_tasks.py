"""Index upkeep as steps generators, so that the builds and folds of many requests and layers run
as one batch.

Building or folding an index (reference.py) is written as a *steps* generator: it yields the
k-means problems it needs (`KMeansTask`, one per k-means block or hierarchy level), receives their
solutions, and finally returns the index. `run` drives one such generator with a solver;
`drive` runs many in lockstep and hands every round's problems to the solver at once. The plain
solver `mp_kernels.kmeans_reference.solve_each` clusters task by task; the batched solver
`mp_kernels.kmeans.solve_batched` runs a whole round as one set of Triton launches, which is what
makes the first decode step of a long batch cheap.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import TypeVar

import torch

from mp_kernels.dispatch import to_device
from mp_kernels.kmeans_reference import KMeansResult, KMeansTask, Solver, solve_each

T = TypeVar("T")
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
