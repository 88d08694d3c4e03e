"""The rules of a real cluster inside the kernels, as small allocation-free scalar functions.

A constrained instance is a plain instance of *items* (a model split into ``tp`` shards times
``replicas`` copies; :mod:`kvgpu.problem` builds them) plus these rules, all carried in one
tuple so that every kernel takes the same arguments whether rules exist or not:

``rules = (allowed, group, node_group, node_of, cur, mfirst, mcount, mig_gb, K, max_gb, coloc)``

* ``allowed`` (n, G) uint8 -- GPUs each item may use (pins, forbidden GPUs); (0, 0): all.
* ``group`` (n,) int64 -- anti-affinity: items with the same id >= 0 sit on distinct GPUs
  (the shards and replicas of one model); (0,): none.
* ``node_group`` (n,) int64 -- items with the same id >= 0 sit inside one node (the tp shards of
  one replica); ``node_of`` (G,) int64 the node of each GPU; (0,): no nodes.
* ``cur`` (n, 1 + r) int64 -- re-placement: column 0 the GPU item ``i`` starts on (one of its
  model's running copies, -1 for none), columns ``1..`` the GPUs the model runs on now (all its
  running copies, -1 padded; all -1 for a new model); (0, 0): not a re-placement.
  ``mfirst`` / ``mcount`` (n,) int64: the first item and the item count of each item's model
  (a model's items are consecutive); ``mig_gb`` (n,) float64 the GB one copied shard costs.
  A model's shards are interchangeable, so the budget is counted on the *set* of GPUs it ends
  on, whatever item sits where: with ``R`` its running GPUs, ``k`` items and ``F`` its final
  GPUs, ``|F - R|`` shards land where it does not run, ``max(0, k - |R|)`` of them are new
  copies (loads, free, like a new model), and the rest, ``max(0, |F - R| - max(0, k - |R|))``,
  are migrations.  Running copies beyond ``k`` (scaling in) are stopped, which moves nothing.
  The model is *moved* when it has a migration; at most ``K`` models (``K < 0``: no limit) and
  ``max_gb`` GB (``inf``: no limit) may move.
* ``coloc`` (n,) int64 -- co-location: item ``i`` must sit on a GPU that holds an item of the
  anti-affinity group ``coloc[i] >= 0`` (a LoRA adapter beside a shard or replica of its base
  model), -1 for none; (0,): no co-location.  Such an item and its base each have a group id of
  their own (``group``), so the group counts of the state say where both are.  Items are placed
  bases first (the greedy start, the exact search and the packings order them so), and no
  transfer leaves an adapter without its base.

The mutable bookkeeping of a placement is the tuple
``state = (gcount, ncount, nnode, away, used)``: ``gcount`` (groups, G) items of each
anti-affinity group per GPU, ``ncount`` / ``nnode`` (node groups,) placed items of each node group
and their node, ``away`` (n,) per model (indexed by its first item) items not on a GPU the model
runs on now, ``used`` (2,) float64 moved models and migrated GB.  :func:`new_state` allocates it once per
search; everything else only reads and updates it.

Items are added and removed with :func:`place` / :func:`unplace` (greedy starts, exact search);
a transfer of up to two items each way between GPUs ``g`` and ``h`` (a move, a swap, a
two-for-one exchange) is checked with :func:`transfer_check` and applied with
:func:`transfer_apply`.  Without rules every check is a few comparisons of empty arrays.
"""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.deltas import fmul
from kvgpu.kernels.jit import kernel

_inline = kernel(inline=True)
njit = kernel()

#: Relative slack of the migrated-GB budget (sums of shard sizes round).
GB_RTOL = 1e-9


@njit
def no_rules():
    """``rules`` for an instance without any (see the module doc)."""
    e = np.empty(0, np.int64)
    return (np.empty((0, 0), np.uint8), e, e, e, np.empty((0, 0), np.int64), e, e, np.empty(0), np.int64(-1), np.inf, e)


@_inline
def restricted(rules):
    """Does the instance carry any rule (pins, groups, nodes, a current placement, co-location)?"""
    return (rules[0].shape[0] > 0 or rules[1].shape[0] > 0 or rules[2].shape[0] > 0 or rules[4].shape[0] > 0
            or rules[10].shape[0] > 0)


@_inline
def budgeted(rules):
    """Is it a re-placement (some items have a current GPU that moving away from costs)?"""
    return rules[4].shape[0] > 0


@njit
def new_state(rules, assign, G):
    """Bookkeeping of ``assign`` (n,) (entries < 0: not placed) under ``rules``; allocates."""
    group, node_group, cur = rules[1], rules[2], rules[4]
    ng = 0
    for i in range(group.shape[0]):
        ng = max(ng, group[i] + 1)
    nn = 0
    for i in range(node_group.shape[0]):
        nn = max(nn, node_group[i] + 1)
    state = (np.zeros((ng, G), np.int64), np.zeros(nn, np.int64), np.full(nn, -1, np.int64),
             np.zeros(cur.shape[0], np.int64), np.zeros(2))
    for i in range(assign.shape[0]):
        if assign[i] >= 0:
            place(rules, state, i, assign[i])
    return state


@njit
def reset_state(rules, state, assign):
    """Recompute ``state`` in place for the placement ``assign`` (no allocation)."""
    gcount, ncount, nnode, away, used = state
    gcount[:] = 0
    ncount[:] = 0
    nnode[:] = -1
    away[:] = 0
    used[:] = 0.0
    for i in range(assign.shape[0]):
        if assign[i] >= 0:
            place(rules, state, i, assign[i])


@_inline
def home(rules, i, g):
    """Is item ``i`` on ``g`` where its model runs now (or is the model new, or is there no
    current placement)?  Items off such GPUs are the model's ``away`` count."""
    cur = rules[4]
    if cur.shape[0] == 0 or cur[i, 1] < 0:
        return True
    for j in range(1, cur.shape[1]):
        if cur[i, j] == g:
            return True
        if cur[i, j] < 0:
            break
    return False


@_inline
def start_gpu(rules, i):
    """The GPU item ``i`` starts on in a re-placement (-1: none; it is placed like a new one)."""
    return rules[4][i, 0] if rules[4].shape[0] else np.int64(-1)


@_inline
def _cost(rules, i, away):
    """``(moved 0/1, migrated GB)`` of item ``i``'s model when ``away`` of its items sit off its
    running GPUs: the new copies among them (items beyond the running ones) are free loads."""
    cur = rules[4]
    running = 0
    for j in range(1, cur.shape[1]):
        if cur[i, j] < 0:
            break
        running += 1
    copied = away - max(0, rules[6][i] - running)
    if copied <= 0:
        return 0.0, 0.0
    return 1.0, fmul(float(copied), rules[7][i])  # rounded: the device never fuses it into the budget's sums


@_inline
def _count_move(rules, state, i, delta):
    """``away`` of item ``i``'s model changes by ``delta``: the budget's (models, GB) change."""
    away = state[3]
    m0 = rules[5][i]
    m_before, gb_before = _cost(rules, i, away[m0])
    away[m0] += delta
    m_after, gb_after = _cost(rules, i, away[m0])
    state[4][0] += m_after - m_before
    state[4][1] += gb_after - gb_before


@njit
def place(rules, state, i, h):
    """Add item ``i`` on GPU ``h`` to the bookkeeping (no checks: see :func:`may_place`)."""
    group, node_group = rules[1], rules[2]
    if group.shape[0] and group[i] >= 0:
        state[0][group[i], h] += 1
    if node_group.shape[0] and node_group[i] >= 0:
        k = node_group[i]
        state[1][k] += 1
        state[2][k] = rules[3][h]
    if budgeted(rules) and not home(rules, i, h):
        _count_move(rules, state, i, np.int64(1))


@njit
def unplace(rules, state, i, g):
    """Take item ``i`` off GPU ``g`` in the bookkeeping."""
    group, node_group = rules[1], rules[2]
    if group.shape[0] and group[i] >= 0:
        state[0][group[i], g] -= 1
    if node_group.shape[0] and node_group[i] >= 0:
        k = node_group[i]
        state[1][k] -= 1
        if state[1][k] == 0:
            state[2][k] = -1
    if budgeted(rules) and not home(rules, i, g):
        _count_move(rules, state, i, np.int64(-1))


@njit
def may_place(rules, state, i, h):
    """Can item ``i`` (not placed) go to GPU ``h``: allowed there, no item of its anti-affinity
    group there, inside its node group's node, beside its base (co-location)?  Memory and
    budget are the caller's."""
    allowed, group, node_group, coloc = rules[0], rules[1], rules[2], rules[10]
    if allowed.shape[0] and not allowed[i, h]:
        return False
    if coloc.shape[0] and coloc[i] >= 0 and state[0][coloc[i], h] == 0:
        return False
    if group.shape[0] and group[i] >= 0 and state[0][group[i], h] > 0:
        return False
    if node_group.shape[0] and node_group[i] >= 0:
        k = node_group[i]
        if state[1][k] > 0 and state[2][k] != rules[3][h]:
            return False
    return True


@_inline
def within_budget(rules, state, d_moved, d_gb):
    """Does a change of (moved models, migrated GB) keep the budget?  A change that does not add
    to either is always allowed (a start over budget may only improve)."""
    if not budgeted(rules):
        return True
    used = state[4]
    K, max_gb = rules[8], rules[9]
    if K >= 0 and used[0] + d_moved > K and d_moved > 0:
        return False
    if d_gb > 0 and used[1] + d_gb > max_gb * (1.0 + GB_RTOL) + 1e-12:
        return False
    return True


@_inline
def budget_held(rules, state):
    """Is the placement's bookkeeping within the budget (moved models, migrated GB)?"""
    if not budgeted(rules):
        return True
    used = state[4]
    return (rules[8] < 0 or used[0] <= rules[8]) and used[1] <= rules[9] * (1.0 + GB_RTOL) + 1e-12


@_inline
def _count_after(rules, state, k, dst, x1, x2, y1, y2):
    """Items of group ``k`` on ``dst`` after a transfer in which ``dst`` receives ``x1``, ``x2``
    and gives ``y1``, ``y2`` (-1: none)."""
    group = rules[1]
    c = state[0][k, dst]
    for x in (x1, x2):
        if x >= 0 and group[x] == k:
            c += 1
    for y in (y1, y2):
        if y >= 0 and group[y] == k:
            c -= 1
    return c


@_inline
def _group_ok(rules, state, k, dst, x1, x2, y1, y2):
    """After the transfer, at most one item of group ``k`` on ``dst`` (see :func:`_count_after`)."""
    return _count_after(rules, state, k, dst, x1, x2, y1, y2) <= 1


@njit
def _coloc_ok(rules, state, dst, x1, x2, y1, y2):
    """Co-location on ``dst`` after it receives ``x1``, ``x2`` and gives ``y1``, ``y2``: an
    arriving adapter finds its base there, and a leaving base leaves none of its adapters
    behind (a scan of the items: co-location is rare and its instances small)."""
    group, coloc = rules[1], rules[10]
    for x in (x1, x2):
        if x >= 0 and coloc[x] >= 0 and _count_after(rules, state, coloc[x], dst, x1, x2, y1, y2) == 0:
            return False
    for y in (y1, y2):
        if y < 0 or group[y] < 0 or _count_after(rules, state, group[y], dst, x1, x2, y1, y2) > 0:
            continue
        for j in range(coloc.shape[0]):
            if coloc[j] == group[y] and _count_after(rules, state, group[j], dst, x1, x2, y1, y2) > 0:
                return False
    return True


@njit
def coloc_held(rules, state, g):
    """Does every adapter on GPU ``g`` find its base there (after items were taken off ``g``
    by :func:`unplace`)?"""
    group, coloc = rules[1], rules[10]
    for j in range(coloc.shape[0]):
        if coloc[j] >= 0 and state[0][group[j], g] > 0 and state[0][coloc[j], g] == 0:
            return False
    return True


@njit
def transfer_check(rules, state, g, h, x1, x2, y1, y2):
    """May items ``x1``, ``x2`` go from GPU ``g`` to ``h`` while ``y1``, ``y2`` go from ``h`` to
    ``g`` (-1: none)?  Returns ``(ok, change of moved models, change of migrated GB)``; memory
    is the caller's."""
    if not restricted(rules):
        return True, 0.0, 0.0
    allowed, group, node_group = rules[0], rules[1], rules[2]
    for x, dst in ((x1, h), (x2, h), (y1, g), (y2, g)):
        if x < 0:
            continue
        if allowed.shape[0] and not allowed[x, dst]:
            return False, 0.0, 0.0
        if node_group.shape[0] and node_group[x] >= 0 and rules[3][g] != rules[3][h]:
            return False, 0.0, 0.0  # the rest of its node group stays in the other node
    if group.shape[0]:
        for x in (x1, x2):  # swapping a model's own shards changes nothing: never a step
            for y in (y1, y2):
                if x >= 0 and y >= 0 and group[x] >= 0 and group[x] == group[y]:
                    return False, 0.0, 0.0
        for x in (x1, x2):
            if x >= 0 and group[x] >= 0 and not _group_ok(rules, state, group[x], h, x1, x2, y1, y2):
                return False, 0.0, 0.0
        for y in (y1, y2):
            if y >= 0 and group[y] >= 0 and not _group_ok(rules, state, group[y], g, y1, y2, x1, x2):
                return False, 0.0, 0.0
    if rules[10].shape[0] and not (_coloc_ok(rules, state, h, x1, x2, y1, y2) and
                                   _coloc_ok(rules, state, g, y1, y2, x1, x2)):
        return False, 0.0, 0.0
    if not budgeted(rules):
        return True, 0.0, 0.0
    # items of one transfer belong to distinct models (a model's items never share a GPU, and
    # its own shards are never swapped), so each model's away count changes by at most one here
    away = state[3]
    d_moved = 0.0
    d_gb = 0.0
    for x, src, dst in ((x1, g, h), (x2, g, h), (y1, h, g), (y2, h, g)):
        if x < 0:
            continue
        d = (0 if home(rules, x, dst) else 1) - (0 if home(rules, x, src) else 1)
        a = away[rules[5][x]]
        m_before, gb_before = _cost(rules, x, a)
        m_after, gb_after = _cost(rules, x, a + d)
        d_moved += m_after - m_before
        d_gb += gb_after - gb_before
    return within_budget(rules, state, d_moved, d_gb), d_moved, d_gb


@njit
def transfer_apply(rules, state, g, h, x1, x2, y1, y2):
    """Update the bookkeeping for a transfer checked by :func:`transfer_check`."""
    if not restricted(rules):
        return
    for x, src, dst in ((x1, g, h), (x2, g, h), (y1, h, g), (y2, h, g)):
        if x >= 0:
            unplace(rules, state, x, src)
            place(rules, state, x, dst)
