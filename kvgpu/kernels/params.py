"""The seed pipeline's parameters (SPEC.md), defined once for every engine.

Policy and ordering codes are small integers so that array lanes and compiled kernels can carry
them; the reference uses the policy names ``POLICY_NAMES[code]``.
"""

#: Bounds divide by ``max(den, DEN_FLOOR)``.
DEN_FLOOR = 1e-9
#: Pair bound over the largest ``N_PAIR`` models; triplets over the largest ``N_TRIPLET`` with
#: inner indices within ``WINDOW``; k-prefix terms for k up to these (start, first retune).
N_PAIR, N_TRIPLET, WINDOW = 120, 60, 8
K_PREFIX_START, K_PREFIX_RETUNE = 6, 4

#: GPU policies: 0-2 parametric (respect the transformed capacity T*M), 3-5 memory only.
RESID, MINMAX, HYBRID, MOST_FREE, BEST_FIT, FIRST_FIT = range(6)
POLICY_NAMES = ("resid", "minmax", "hybrid")
#: Model orderings, descending: 0 (w+T*s, w, s), 1 (w/(M-s), s), 2 (w/s, w), 3 (s, w).
SIZE_ORDER = 3

#: The seven (ordering, policy) variants that decide whether a T is feasible, in order.
FEAS_ORDERING = (0, 1, 2, 0, 1, 0, 1)
FEAS_POLICY = (RESID, RESID, RESID, MINMAX, MINMAX, HYBRID, HYBRID)
#: Candidates are packed at T_high times each factor.
T_FACTORS = (0.985, 0.99, 0.995, 1.0, 1.005, 1.01)
#: T is raised after these shares of the models are placed.
RETUNE_FRACTIONS = (0.4, 0.75)
#: The "dual" memory pack puts this share of the models on the GPU with most free memory.
DUAL_MOST_FREE_SHARE = 0.3

# Search beyond the seed (kernels/search.py, kernels/exact.py)
#: Load slack (GB) of the "load S + W/T fits in memory M" test, so rounding (~1e-13 GB) never
#: reads as overflow; it only makes a target easier, so "infeasible" stays a proof.
CAP_SLACK = 1e-11
#: ``max_kvpr <= lower_bound * (1 + OPTIMAL_RTOL)`` counts as optimal (proven).
OPTIMAL_RTOL = 1e-9
