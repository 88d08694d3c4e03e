"""Replay a placement policy over a demand trace, window after window.

:func:`replay` runs one or several policies over request rates per window ``D`` (n_models, W)
and reports, per policy and window, the max KVPR of the placement that serves the window, the
models moved and the GB migrated before it, and one summary row per policy:

* ``static`` -- one placement for the whole trace: the robust placement over every window
  (:func:`kvgpu.solve` with ``demand=D``).  It sees the whole trace in advance (a static
  placement chosen with hindsight, not a forecast), and never moves anything.
* ``replan`` -- every ``every`` windows (window 0 included), re-place for the demand of the
  window about to be served: window 0 is today's :func:`kvgpu.solve` on its rates, each later
  decision today's :func:`kvgpu.replan` from the running placement with ``max_moves``,
  ``max_migrated_gb`` and ``min_gain`` (None: no limit, and :func:`kvgpu.replan`'s own
  default ``min_gain``).  Between decisions the placement stays.  The policy knows the demand
  of the window it re-places for (an oracle forecast of one window); the windows it holds the
  placement for are served as they come.
* ``greedy`` -- a baseline in the manner of Prism's periodic re-placement: every ``every``
  windows the greedy seed pipeline (``mode="seed"``: the ADRS evaluator's greedy, which kvgpu
  reproduces) places everything afresh for the coming window's rates; its GPUs are matched to
  the running ones greedily, largest GB kept in place first, among interchangeable GPUs (same
  memory); the new placement is taken when it lowers that window's max KVPR by at least
  ``min_gain`` (default 0: any gain), whatever it moves (``max_moves`` / ``max_migrated_gb``
  are refused: the greedy has no budget).  Plain models only (the seed pipeline's limit).
  This is kvgpu's reading of that scheduler, not Prism's code.

The placements are solved with the same options (``effort``, ``seed``, ``gpu_mem``, ...) as
:func:`kvgpu.solve`; rules other than what the two entry points take are refused by them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from kvgpu.errors import InvalidInstance
from kvgpu.robust import demand_rates, item_demand, window_kvpr
from kvgpu.schema import integer, model_specs, number

POLICIES = ("static", "replan", "greedy")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A placement policy (module doc): ``name`` one of :data:`POLICIES`; for ``replan``,
    re-place every ``every`` windows within ``max_moves`` models and ``max_migrated_gb`` GB,
    moving nothing unless the max KVPR gains ``min_gain`` (relative)."""

    name: str = "static"
    every: int = 1
    max_moves: int | None = None
    max_migrated_gb: float | None = None
    min_gain: float | None = None

    def __post_init__(self):
        if self.name not in POLICIES:
            raise InvalidInstance(f"policy: {self.name!r} is not one of {POLICIES}")
        object.__setattr__(self, "every", integer(self.every, "policy every", 1, None))
        if self.name == "static" and (self.every != 1 or self.max_moves is not None
                                      or self.max_migrated_gb is not None or self.min_gain is not None):
            raise InvalidInstance("policy 'static' places once and moves nothing: every, max_moves, "
                                  "max_migrated_gb and min_gain belong to policy 'replan'")
        if self.name == "greedy" and (self.max_moves is not None or self.max_migrated_gb is not None):
            raise InvalidInstance("policy 'greedy' re-places everything its greedy moves: max_moves and "
                                  "max_migrated_gb belong to policy 'replan' (min_gain and every apply)")
        if self.max_moves is not None:
            object.__setattr__(self, "max_moves", integer(self.max_moves, "policy max_moves", 0, None))
        if self.max_migrated_gb is not None:
            object.__setattr__(self, "max_migrated_gb", number(self.max_migrated_gb, "policy max_migrated_gb", 0.0,
                                                               math.inf))
        if self.min_gain is not None:
            object.__setattr__(self, "min_gain", number(self.min_gain, "policy min_gain", 0.0, 1.0))

    @property
    def label(self) -> str:
        """The policy in words, as tables name it (``replan every=4 max_moves=2``)."""
        if self.name == "static":
            return "static (robust)"
        extra = [f"{k}={getattr(self, k):g}" for k in ("max_moves", "max_migrated_gb", "min_gain")
                 if getattr(self, k) is not None]
        return " ".join([f"{self.name} every={self.every}"] + extra)


def as_policy(p: Any) -> Policy:
    """A :class:`Policy` from a Policy, a name (``"static"``, ``"replan"``) or a dict of its fields."""
    if isinstance(p, Policy):
        return p
    if isinstance(p, str):
        return Policy(p)
    if isinstance(p, dict):
        unknown = set(p) - {f.name for f in dataclasses.fields(Policy)} - {"policy"}
        if unknown:
            raise InvalidInstance(f"policy: unknown key(s) {sorted(unknown)}; known: name (or policy), every, "
                                  f"max_moves, max_migrated_gb, min_gain")
        d = dict(p)
        if "policy" in d:
            d["name"] = d.pop("policy")
        return Policy(**d)
    raise InvalidInstance(f"policy: expected a name {POLICIES}, a dict or a kvgpu.policy.Policy, got {p!r}")


@dataclasses.dataclass
class ReplayResult:
    """What :func:`replay` returns.

    Attributes
    ----------
    policies : list[Policy]
    max_kvpr : (P, W) float64 -- per policy and window, the max KVPR over GPUs of the placement
        serving the window.
    moved : (P, W) int64 -- models moved before the window (0 where no decision).
    migrated_gb : (P, W) float64 -- GB copied before the window.
    assignments : list of (W, n) int64 -- per policy, the GPU of each item in each window.
    """

    policies: list
    max_kvpr: np.ndarray
    moved: np.ndarray
    migrated_gb: np.ndarray
    assignments: list

    def summary(self) -> list[dict]:
        """One row per policy: ``policy``, ``worst_kvpr`` (max over windows), ``mean_kvpr`` (mean
        over windows of the max KVPR), ``p95_kvpr`` (the worst max KVPR met in 95% of the windows:
        a window's own value, as :meth:`kvgpu.demand.WindowEvaluation.quantile` reports it),
        ``moves`` (models moved in all), ``migrated_gb``."""
        return [{"policy": p.label, "worst_kvpr": float(self.max_kvpr[k].max()),
                 "mean_kvpr": float(self.max_kvpr[k].mean()),
                 "p95_kvpr": float(np.quantile(self.max_kvpr[k], 0.95, method="inverted_cdf")),
                 "moves": int(self.moved[k].sum()), "migrated_gb": float(self.migrated_gb[k].sum())}
                for k, p in enumerate(self.policies)]

    def rows(self) -> list[dict]:
        """One row per policy and window: ``policy``, ``window``, ``max_kvpr``, ``moved``,
        ``migrated_gb`` (the long table)."""
        return [{"policy": p.label, "window": t, "max_kvpr": float(self.max_kvpr[k, t]),
                 "moved": int(self.moved[k, t]), "migrated_gb": float(self.migrated_gb[k, t])}
                for k, p in enumerate(self.policies) for t in range(self.max_kvpr.shape[1])]

    def plot(self, path) -> None:
        """Draw the replay to an image file (:func:`kvgpu.plot.replay`; needs matplotlib)."""
        from kvgpu import plot

        plot.replay(self, path)

    def __str__(self) -> str:
        lines = [f"{'policy':<40} {'worst KVPR':>11} {'mean':>9} {'p95':>9} {'moves':>6} {'GB moved':>9}"]
        for r in self.summary():
            lines.append(f"{r['policy']:<40} {r['worst_kvpr']:>11.6f} {r['mean_kvpr']:>9.6f} {r['p95_kvpr']:>9.6f} "
                         f"{r['moves']:>6} {r['migrated_gb']:>9.1f}")
        lines.append(f"({self.max_kvpr.shape[1]} windows; KVPR: the max over GPUs of each window's placement)")
        return "\n".join(lines)


#: The policies :func:`replay` compares unless told: the static robust placement, and a re-plan
#: every 4 windows moving at most 8 models each time (an unlimited re-plan moves most of the
#: cluster for the gain of a few: measured on a 64-GPU bursty day, 228 models for the KVPR that
#: 4 moves reach, and 4.4 s a decision against 0.13 s).
DEFAULT_POLICIES = ("static", {"name": "replan", "every": 4, "max_moves": 8})


def replay(models: Any, gpus: int, demand, policy: Any = DEFAULT_POLICIES, **solve_kwargs) -> ReplayResult:
    """Replay ``policy`` (one, or a list to compare: names, dicts of :class:`Policy` fields, or
    Policy objects) over the rates ``demand`` (n_models, W) (module doc).  ``solve_kwargs``: options of :func:`kvgpu.solve` (``gpu_mem``, ``effort``,
    ``seed``, ``reserve_gb``, ...); a current placement (``current``, ``cur_gpu_id``) and the
    re-placement budgets belong to the policies and are refused here."""
    for key in ("current", "max_moves", "max_migrated_gb", "min_gain", "demand"):
        if key in solve_kwargs:
            raise InvalidInstance(f"replay: {key} is set per policy (kvgpu.policy.Policy) or by the trace, not as an "
                                  f"option of the replay")
    pols = [as_policy(p) for p in ([policy] if isinstance(policy, (str, dict, Policy)) else list(policy))]
    if not pols:
        raise InvalidInstance("replay: no policy given")
    models = list(models) if not hasattr(models, "columns") else models  # read more than once
    D = demand_rates(demand, len(model_specs(models)))
    run = {"static": lambda p: _static(models, gpus, D, solve_kwargs),
           "replan": lambda p: _replan(models, gpus, D, p, solve_kwargs),
           "greedy": lambda p: _greedy(models, gpus, D, p, solve_kwargs)}
    out = [run[p.name](p) for p in pols]
    kv = np.array([_served(prob, D, a) for a, _, _, prob in out])
    return ReplayResult(pols, kv, np.array([m for _, m, _, _ in out]), np.array([g for _, _, g, _ in out]),
                        [a for a, _, _, _ in out])


def _served(prob, D: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """(W,) the max KVPR of window ``t``'s placement ``assign[t]`` under window ``t``'s rates."""
    if prob.is_replan:
        raise InvalidInstance("replay: the models carry cur_gpu_id; a replay starts from its own first placement "
                              "(drop cur_gpu_id)")
    wd = item_demand(prob, D)
    return np.array([float(window_kvpr(prob.items.sizes, wd[:, [t]], prob.items.gpu_mem, assign[t]).max())
                     for t in range(D.shape[1])])


def _static(models, gpus, D, kwargs) -> tuple:
    """(W, n) assignment, (W,) moved, (W,) GB of the static robust placement, and its problem."""
    from kvgpu.api import solve

    p = solve(models, gpus, demand=D, **kwargs)
    W = D.shape[1]
    return np.repeat(p.assignment[None, :], W, axis=0), np.zeros(W, np.int64), np.zeros(W), p.problem


def _replan(models, gpus, D, pol: Policy, kwargs) -> tuple:
    """(W, n) assignment, (W,) moved, (W,) GB of a re-plan policy, and its first problem."""
    from kvgpu.api import replan, solve

    W = D.shape[1]
    moved, gb = np.zeros(W, np.int64), np.zeros(W)
    p = solve(models, gpus, demand=D[:, [0]], **kwargs)
    first = p.problem
    rows = []
    for t in range(W):
        if t > 0 and t % pol.every == 0:
            p = replan(models, gpus, current=_current(p), demand=D[:, [t]], max_moves=pol.max_moves,
                       max_migrated_gb=pol.max_migrated_gb, min_gain=pol.min_gain, **kwargs)
            moved[t] = p.moved_models
            gb[t] = sum(m.size_gb for m in p.moves)
        rows.append(p.assignment)
    return np.array(rows), moved, gb, first


def _current(p) -> list:
    """Each model's running GPUs (one id, or a list for shards / replicas) for ``current=``."""
    return [g[0] if len(g) == 1 else g for g in p.gpus_of_models()]


def _greedy(models, gpus, D, pol: Policy, kwargs) -> tuple:
    """(W, n) assignment, (W,) moved, (W,) GB of the greedy baseline (module doc), and its
    problem."""
    from kvgpu.api import solve

    opts = {k: v for k, v in kwargs.items() if k not in ("effort", "patience", "seed", "objective")}
    W = D.shape[1]
    moved, gb = np.zeros(W, np.int64), np.zeros(W)
    try:
        first = solve(models, gpus, demand=D[:, [0]], mode="seed", **opts)
    except InvalidInstance as e:  # the seed pipeline's refusal of rules, said as the policy's
        raise InvalidInstance(f"policy 'greedy' (the seed pipeline, plain models only): {e}; use policy "
                              f"'replan'") from None
    prob = first.problem
    wd = item_demand(prob, D)
    size_gb = np.array([s.size for s in prob.specs])[prob.model_of]  # a plain model: one item
    cur = first.assignment
    rows = []
    for t in range(W):
        if t > 0 and t % pol.every == 0:
            new = _match_gpus(solve(models, gpus, demand=D[:, [t]], mode="seed", **opts).assignment, cur, prob)
            now = float(window_kvpr(prob.items.sizes, wd[:, [t]], prob.items.gpu_mem, cur).max())
            then = float(window_kvpr(prob.items.sizes, wd[:, [t]], prob.items.gpu_mem, new).max())
            if then < now and (not pol.min_gain or then <= now * (1 - pol.min_gain)):
                changed = new != cur
                moved[t], gb[t], cur = int(changed.sum()), float(size_gb[changed].sum()), new
        rows.append(cur)
    return np.array(rows), moved, gb, prob


def _match_gpus(new: np.ndarray, cur: np.ndarray, prob) -> np.ndarray:
    """``new`` with its GPUs renamed to running ones of the same memory, greedily: the pair
    (new GPU, running GPU) sharing the most GB of models first (ties: lowest ids)."""
    G = prob.n_gpus
    s, mem = prob.items.sizes, prob.items.gpu_mem
    keep = np.zeros((G, G))
    np.add.at(keep, (new, cur), s)  # GB on new GPU a that runs on GPU b now
    keep[mem[:, None] != mem[None, :]] = -1.0  # only GPUs of the same memory are interchangeable
    name = np.full(G, -1, np.int64)
    taken = np.zeros(G, bool)
    for flat in np.argsort(-keep, axis=None, kind="stable").tolist():
        a, b = divmod(flat, G)
        if keep[a, b] < 0:
            break
        if name[a] < 0 and not taken[b]:
            name[a], taken[b] = b, True
    return name[new]
