"""GPU fractions: the quarter grid, and how many GPUs a multiset of fractional instances needs.

Fractional instances (gpu_frac < 1, at tp = 1) share GPUs, Σ gpu_frac ≤ 1 on each. Instances are
packed best-fit decreasing (`fraction_bins`): this is the packing placement uses, so plan checks,
placement and the planner count the same GPUs. The planner's fractions lie on the quarter grid
(`QUARTERS`: an instance of size k/4 takes k of a GPU's `SLOTS` quarters), where the packing needs
exactly the fewest GPUs, in closed form `quarter_gpus` — what the allocation MILP's constraints
(3) and (4) state linearly with the sizes and shares below.
"""

from __future__ import annotations

from typing import Sequence

QUARTERS = {0.25: 1, 0.5: 2, 0.75: 3}  # gpu_frac → k, the instance's size in quarters of a GPU
SLOTS = 4                              # quarters per GPU
# A GPU's share each instance larger than a quarter takes among those: a 3/4 leaves room for none
# of them, two halves pair up (so a GPU holds one 3/4, or two 1/2, plus quarters in the gaps).
LARGE_SHARE = {3: 1.0, 2: 0.5}
EPS = 1e-9  # slack on Σ gpu_frac ≤ 1 for fractions such as 1/3 that sum to 1 in binary only roughly


def quarter(gpu_frac: float) -> int:
    """k for an instance of size k/4 < 1, 0 for whole GPUs (KeyError off the quarter grid)."""
    return 0 if gpu_frac >= 1.0 else QUARTERS[round(gpu_frac, 4)]


def on_quarter_grid(gpu_frac: float) -> bool:
    """Whether a fraction below one is a quarter-grid size."""
    return round(gpu_frac, 4) in QUARTERS


def fraction_bins(fracs: Sequence[float]) -> list[list[int]]:
    """Best-fit decreasing: indices into `fracs` per shared GPU, in the order the GPUs are opened."""
    order = sorted(range(len(fracs)), key=lambda i: -fracs[i])
    bins: list[tuple[float, list[int]]] = []
    for i in order:
        fits = [b for b in range(len(bins)) if bins[b][0] + fracs[i] <= 1.0 + EPS]
        if fits:
            b = max(fits, key=lambda b: bins[b][0])
            bins[b] = (bins[b][0] + fracs[i], bins[b][1] + [i])
        else:
            bins.append((fracs[i], [i]))
    return [b for _, b in bins]


def gpus_for_fractions(fracs: Sequence[float]) -> int:
    """GPUs that fractional instances of sizes `fracs` are packed onto."""
    return len(fraction_bins(fracs))


def quarter_gpus(n1: int, n2: int, n3: int) -> int:
    """GPUs `n_k` instances of size k/4 are packed onto (the fewest that hold them): every 3/4 takes
    a GPU, halves pair, quarters fill the gaps — `gpus_for_fractions` of that multiset, in O(1)."""
    return max(n3 + (n2 + 1) // 2, (3 * n3 + 2 * n2 + n1 + SLOTS - 1) // SLOTS)
