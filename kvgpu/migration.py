"""Re-placement plans: the steps from the placement a cluster runs now to a new one, in an
order that keeps every GPU within its memory at every step.

Per model, with ``R`` the GPUs it runs on now and ``F`` those it ends on (its shards are
interchangeable), the GPUs of ``F - R`` *arrive* and those of ``R - F`` *leave*.  A step is
one of:

* a migration ``src -> dst``: a shard is copied to an arriving GPU, then the leaving copy on
  ``src`` stops (``dst`` needs room for it first; ``src`` is freed after);
* a load ``-1 -> dst``: a new copy (a new model, or a model scaling out: more arrivals than
  leavings) needs room on ``dst``;
* a stop ``src -> -1``: a model scaling in (more leavings than arrivals) stops a copy, which
  frees ``src`` and moves nothing.

A model's migrations may pair any of its leaving GPUs with any of its arriving ones, and its
stops may be any of its leaving copies: :func:`plan` searches the orders (and pairings) for one
that fits memory at every step -- in each group of steps sharing GPUs on its own, exhaustively
up to ``PLAN_NODES`` states --, so a cycle is named only when no order exists.
"""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.deltas import EPS, mem_unit
from kvgpu.problem import Problem
from kvgpu.results import Move, printable

#: States (sets of steps taken) the order search may visit in one group of steps that share GPUs
#: before it settles for the greedy order.
PLAN_NODES = 50_000
#: Most steps the order search takes on (one level of recursion each); longer plans the greedy
#: order could not finish are reported without a claim that no order exists.
PLAN_DEPTH = 400


def _changes(problem: Problem, assign: np.ndarray) -> list[tuple[int, float, list[int], list[int], int]]:
    """Per model that changes: ``(model, shard GB, arriving GPUs, leaving GPUs, loads)``; the
    model makes ``min(arriving, leaving)`` migrations, ``loads`` new copies and stops the rest."""
    out = []
    for m, running in enumerate(problem.running):
        items = problem.items_of(m)
        final = {int(g) for g in assign[items]}
        arriving, leaving = sorted(final - set(running)), sorted(set(running) - final)
        if arriving or leaving:
            out.append((m, float(problem.items.sizes[items[0]]), arriving, leaving,
                        max(0, len(arriving) - len(leaving))))
    return out


def _base_models(problem: Problem) -> dict[int, int]:
    """Adapter model -> its base model (``colocate_with``), from the co-location rule's items:
    an adapter moves or loads only onto a GPU its base holds a copy on at that moment."""
    if not problem.coloc.shape[0]:
        return {}
    adapters = np.nonzero(problem.coloc >= 0)[0]
    return {int(problem.model_of[i]): int(problem.coloc[i]) for i in adapters}


def _start_memory(problem: Problem) -> np.ndarray:
    """(G,) GB the running copies hold now."""
    used = np.zeros(problem.n_gpus)
    for m, running in enumerate(problem.running):
        if running:
            used[list(running)] += problem.items.sizes[problem.items_of(m)[0]]
    return used


class _Search:
    """Depth-first search over the steps of :func:`_changes`: a state is the set of arrivals
    done and the set of leaving copies freed (the memory in use follows from it); states that
    lead nowhere are remembered."""

    def __init__(self, problem: Problem, changes, used: np.ndarray):
        self.problem, self.changes = problem, changes
        self.M = problem.items.gpu_mem
        self.used = used
        self.arr = [(c, g) for c, ch in enumerate(changes) for g in ch[2]]
        self.lea = [(c, g) for c, ch in enumerate(changes) for g in ch[3]]
        self.dead: set = set()
        self.nodes = 0
        self.exhaustive = True
        base = _base_models(problem)
        change_of = {ch[0]: c for c, ch in enumerate(changes)}
        #: per change of an adapter: its base's model and the base's change (None: it stays)
        self.base = {c: (base[ch[0]], change_of.get(base[ch[0]])) for c, ch in enumerate(changes) if ch[0] in base}

    def _base_on(self, done: int, freed: int, c: int, g: int) -> bool:
        """Does the base of change ``c``'s adapter hold a copy on ``g`` in this state?"""
        b, cb = self.base[c]
        if cb is None:
            return g in self.problem.running[b]
        if any(c2 == cb and g2 == g and (done >> k) & 1 for k, (c2, g2) in enumerate(self.arr)):
            return True
        left = any(c2 == cb and g2 == g and (freed >> j) & 1 for j, (c2, g2) in enumerate(self.lea))
        return g in self.problem.running[b] and not left

    def _fits(self, dst: int, gb: float) -> bool:
        return self.used[dst] + gb <= self.M[dst] + EPS * mem_unit(self.M[dst])

    def _counts(self, done: int, freed: int) -> list[tuple[int, int, int]]:
        """Per change: ``(migrations, loads, stops)`` done.  A model either loads (more arrivals
        than leavings) or stops copies (fewer), never both, so the sets of arrivals done and
        copies freed determine them."""
        n_done = [0] * len(self.changes)
        n_freed = [0] * len(self.changes)
        for k, (c, _) in enumerate(self.arr):
            n_done[c] += (done >> k) & 1
        for j, (c, _) in enumerate(self.lea):
            n_freed[c] += (freed >> j) & 1
        out = []
        for c, (_, _, arriving, leaving, _) in enumerate(self.changes):
            if len(arriving) >= len(leaving):
                out.append((n_freed[c], n_done[c] - n_freed[c], 0))
            else:
                out.append((n_done[c], 0, n_freed[c] - n_done[c]))
        return out

    def _options(self, done: int, freed: int) -> list[tuple[int, int]]:
        """The steps possible now as ``(arrival or -1, leaving copy or -1)``: stops first (they
        only free memory), then migrations and loads, onto the GPUs with the most room first."""
        counts = self._counts(done, freed)
        stops, moves = [], []
        for j, (c, _) in enumerate(self.lea):
            _, _, arriving, leaving, _ = self.changes[c]
            if not (freed >> j) & 1 and counts[c][2] < len(leaving) - len(arriving):
                stops.append((-1, j))
        for k, (c, g) in enumerate(self.arr):
            _, gb, arriving, leaving, loads = self.changes[c]
            if (done >> k) & 1 or not self._fits(g, gb) or (c in self.base and not self._base_on(done, freed, c, g)):
                continue
            if counts[c][1] < loads:
                moves.append((k, -1))
            if counts[c][0] < min(len(arriving), len(leaving)):
                moves += [(k, j) for j, (c2, _) in enumerate(self.lea) if c2 == c and not (freed >> j) & 1]
        moves.sort(key=lambda kj: self.used[self.arr[kj[0]][1]] - self.M[self.arr[kj[0]][1]])
        return stops + moves

    def _apply(self, step, sign: float) -> None:
        k, j = step
        if k >= 0:
            c, g = self.arr[k]
            self.used[g] += sign * self.changes[c][1]
        if j >= 0:
            c, g = self.lea[j]
            self.used[g] -= sign * self.changes[c][1]

    def run(self, done: int = 0, freed: int = 0, path: list | None = None) -> list | None:
        """The steps from this state to the end, or None when no order exists from it (or the
        search ran out of states: then ``exhaustive`` is False)."""
        path = [] if path is None else path
        full_a, full_l = (1 << len(self.arr)) - 1, (1 << len(self.lea)) - 1
        if done == full_a and freed == full_l:
            return path
        if (done, freed) in self.dead:
            return None
        self.nodes += 1
        if self.nodes > PLAN_NODES:
            self.exhaustive = False
            return None
        for step in self._options(done, freed):
            k, j = step
            self._apply(step, 1.0)
            found = self.run(done | (1 << k if k >= 0 else 0), freed | (1 << j if j >= 0 else 0), path + [step])
            self._apply(step, -1.0)
            if found is not None:
                return found
            if not self.exhaustive:
                return None
        self.dead.add((done, freed))
        return None

    def move(self, step) -> Move:
        k, j = step
        c = self.arr[k][0] if k >= 0 else self.lea[j][0]
        return _move(self.problem, self.changes[c][0], self.lea[j][1] if j >= 0 else -1,
                     self.arr[k][1] if k >= 0 else -1)


def _greedy(problem: Problem, changes, used: np.ndarray) -> tuple[list[Move], list[tuple]]:
    """Stops, then each migration / load as soon as its destination has room (leaving and
    arriving GPUs paired in order): ``(steps taken, (model, GB, src, dst) left waiting)``."""
    M = problem.items.gpu_mem
    base = _base_models(problem)
    on = {b: set(problem.running[b]) for b in base.values()}  # where each base is, step by step
    out, pending = [], []
    for m, gb, arriving, leaving, _ in changes:
        pairs = min(len(arriving), len(leaving))
        for src in leaving[pairs:]:
            used[src] -= gb
            on.get(m, set()).discard(src)
            out.append(_move(problem, m, src, -1))
        pending += [(m, gb, leaving[j] if j < pairs else -1, dst) for j, dst in enumerate(arriving)]
    while pending:
        for k, (m, gb, src, dst) in enumerate(pending):
            if used[dst] + gb <= M[dst] + EPS * mem_unit(M[dst]) and (m not in base or dst in on[base[m]]):
                used[dst] += gb
                if m in on:  # a base: where its adapters may now go
                    on[m] = (on[m] - {src}) | {dst}
                if src >= 0:
                    used[src] -= gb
                out.append(_move(problem, m, src, dst))
                del pending[k]
                break
        else:
            break
    return out, pending


def _components(changes) -> list[list[int]]:
    """The changes in groups that share no GPU (a model's arriving and leaving GPUs together):
    memory links steps only through GPUs, so each group's order is found on its own."""
    parent: dict[int, int] = {}

    def root(g):
        while parent.setdefault(g, g) != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for _, _, arriving, leaving, _ in changes:
        gpus = arriving + leaving
        for g in gpus[1:]:
            parent[root(g)] = root(gpus[0])
    groups: dict[int, list[int]] = {}
    for c, ch in enumerate(changes):
        groups.setdefault(root((ch[2] + ch[3])[0]), []).append(c)
    return list(groups.values())


def _search_components(problem: Problem, changes) -> tuple[list[Move] | None, bool]:
    """An order of every step by :class:`_Search` on each group of :func:`_components`, or
    ``(None, proven)``: ``proven`` when a group was searched through and has no order."""
    out: list[Move] = []
    found_all, proven_none = True, False
    for comp in _components(changes):
        search = _Search(problem, [changes[c] for c in comp], _start_memory(problem))
        found = search.run() if len(search.arr) + len(search.lea) <= PLAN_DEPTH else None
        if found is None:
            found_all = False
            proven_none |= search.exhaustive and len(search.arr) + len(search.lea) <= PLAN_DEPTH
            continue
        out += [search.move(s) for s in found]
    return (out if found_all else None), proven_none


def plan(problem: Problem, assign: np.ndarray) -> tuple[list[Move], str | None]:
    """The steps from the running placement (``problem.running``) to ``assign`` (n,) and a
    note, or None (module doc).

    An adapter (``colocate_with``) moves or loads only once its base holds a copy on its
    destination.  The greedy order (:func:`_greedy`) is tried first; when it gets stuck, the order search
    tries every order and pairing (up to ``PLAN_NODES`` states per group of steps that share
    GPUs); when none
    keeps every GPU within its memory, the greedy order is listed with the steps that wait for
    each other (a cycle, e.g. two models swapping GPUs that are both full) last, and the note
    names the spare room that would let them run -- or, when the search ran out of states,
    says that no order was found, not that none exists.
    """
    changes = _changes(problem, assign)
    used = _start_memory(problem)
    out, pending = _greedy(problem, changes, used)
    if not pending:
        return out, None
    ordered, proven_none = _search_components(problem, changes)
    if ordered is not None:
        return ordered, None
    M = problem.items.gpu_mem
    short = [(used[dst] + gb - M[dst], dst) for _, gb, _, dst in pending]
    need, g = min(short)
    names = sorted({printable(_label(problem, m)) for m, _, _, _ in pending})  # a note is text: one line
    out += [_move(problem, m, src, dst) for m, _, src, dst in pending]
    if proven_none:
        why = "no order keeps every GPU within its memory (every order tried)"
    else:
        why = "no order keeping every GPU within its memory was found by a bounded search (one may exist)"
    note = (f"the last {len(pending)} step(s) ({', '.join(names)}) wait for each other: {why}; {need:.3g} GB spare "
            f"on GPU {g} (or stopping one of these models while the others move) lets them run")
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
