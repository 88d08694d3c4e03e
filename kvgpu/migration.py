"""Re-placement plans: the steps from the placement a cluster runs now to a new one, in an
order that keeps every GPU within its memory at every step."""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.deltas import EPS, mem_unit
from kvgpu.problem import Problem
from kvgpu.results import Move, printable


def _steps(problem: Problem, assign: np.ndarray) -> tuple[list[tuple], list[tuple]]:
    """``(migrations, loads)`` as ``(model, item, src, dst)``: per model, each running shard
    whose GPU the new placement no longer uses goes to one of the model's new GPUs (shards are
    interchangeable), and new shards are loaded onto the rest."""
    migrations, loads = [], []
    items_of: dict[int, list[int]] = {}
    for i, m in enumerate(problem.model_of.tolist()):
        items_of.setdefault(m, []).append(i)
    for m, items in items_of.items():
        cur = [int(problem.cur[i]) for i in items if problem.cur[i] >= 0]
        final = [int(assign[i]) for i in items]
        leaving = sorted(set(cur) - set(final))
        arriving = sorted(set(final) - set(cur))
        for j, dst in enumerate(arriving):
            src = leaving[j] if j < len(leaving) else -1
            (migrations if src >= 0 else loads).append((m, items[0], src, dst))
    return migrations, loads


def plan(problem: Problem, assign: np.ndarray) -> tuple[list[Move], str | None]:
    """The steps from ``problem.cur`` to ``assign`` (n,) and a note, or None.

    A migration copies a shard to its new GPU before it leaves the old one, so the destination
    must have room for it then; a new model's shard needs room where it is loaded.  Steps are
    taken greedily, migrations first, each as soon as its destination has room; a step never
    takes room another needs for good, because every GPU ends within its memory.  When the
    remaining steps wait for each other (a cycle, e.g. two models swapping GPUs that are both
    full), they are listed last and the note names the spare room that would let them run.
    An adapter (``colocate_with``) moves or loads only once its base holds a shard on its
    destination.
    """
    inst = problem.items
    M = inst.gpu_mem
    used = np.zeros(problem.n_gpus)
    for i in np.nonzero(problem.cur >= 0)[0].tolist():
        used[problem.cur[i]] += inst.sizes[i]
    migrations, loads = _steps(problem, assign)
    pending = migrations + loads
    base = _base_models(problem)
    on = {m: {int(g) for g in problem.cur[problem.model_of == m] if g >= 0} for m in set(base.values())}
    out: list[Move] = []
    while pending:
        for k, (m, i, src, dst) in enumerate(pending):
            size = float(inst.sizes[i])
            if used[dst] + size <= M[dst] + EPS * mem_unit(M[dst]) and (m not in base or dst in on[base[m]]):
                used[dst] += size
                if m in on:  # a base: where its adapters may now go
                    on[m] = (on[m] - {src}) | {dst}
                if src >= 0:
                    used[src] -= size
                out.append(_move(problem, m, src, dst))
                del pending[k]
                break
        else:
            break
    if not pending:
        return out, None
    short = [(used[dst] + float(inst.sizes[i]) - M[dst], dst) for _, i, _, dst in pending]
    need, g = min(short)
    names = sorted({printable(_label(problem, m)) for m, _, _, _ in pending})  # a note is text: one line
    out += [_move(problem, m, src, dst) for m, _, src, dst in pending]
    note = (f"the last {len(pending)} step(s) ({', '.join(names)}) wait for each other: no order keeps every GPU "
            f"within its memory; {need:.3g} GB spare on GPU {g} (or stopping one of these models while the "
            f"others move) lets them run")
    return out, note


def _base_models(problem: Problem) -> dict[int, int]:
    """Adapter model -> its base model, from the co-location rule's items."""
    if not problem.coloc.shape[0]:
        return {}
    adapters = np.nonzero(problem.coloc >= 0)[0]
    return {int(problem.model_of[i]): int(problem.coloc[i]) for i in adapters}


def _label(problem: Problem, m: int) -> str:
    """The model's name; with its input position when the name is not unique (or missing)."""
    name = problem.specs[m].name
    if name is None:
        return f"#{m}"
    if sum(s.name == name for s in problem.specs) > 1:
        return f"{name} (model {m})"
    return name


def _move(problem: Problem, m: int, src: int, dst: int) -> Move:
    spec = problem.specs[m]
    return Move(_label(problem, m), int(src), int(dst), float(spec.size / spec.tp), m)
