"""Which response coding is a PAPI file in? ``python -m palign.data.check [root]``.

For every trait, correlates (across subjects) the mean of a subject's positively keyed items with
the mean of the same subject's negatively keyed items, using the values *as stored*. Positive
correlations mean the negatively keyed answers are stored reverse-scored
(``protocol.coding=keyed``, what ``protocol=clean`` uses); negative ones mean they are stored raw
(``protocol.coding=as_stored``, what ``protocol=paper`` uses).
"""

from __future__ import annotations

import sys

import numpy as np

from palign.constants import TRAITS
from palign.data.papi import N_ITEMS, load_papi
from palign.errors import cli


def keyed_mean_correlations(
    stored: np.ndarray, traits: np.ndarray, key: np.ndarray
) -> dict[str, float]:
    """Per-trait Pearson r between subjects' +keyed and -keyed item means.

    ``stored``: (subjects, items) values as in the file, 0 = missing; ``traits``/``key``: (items,).
    """
    valid = stored != 0
    out = {}
    for trait in TRAITS:
        means = []
        for sign in (1, -1):
            cols = (traits == trait) & (key == sign)
            total = (stored[:, cols] * valid[:, cols]).sum(1)
            means.append(total / np.maximum(valid[:, cols].sum(1), 1))
        out[trait] = float(np.corrcoef(means[0], means[1])[0, 1])
    return out


def verdict(correlations: dict[str, float]) -> str:
    values = np.array(list(correlations.values()))
    if (values > 0).all():
        return "keyed"
    if (values < 0).all():
        return "as_stored"
    return "mixed"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with cli("palign.data.check"):
        data = load_papi(argv[0] if argv else None, coding="as_stored", personas=False)
    items = [data.inventory.items[n] for n in range(1, N_ITEMS + 1)]
    traits = np.array([it.trait for it in items])
    key = np.array([it.key for it in items])
    corr = keyed_mean_correlations(data.answers, traits, key)
    print(f"PAPI data: {data.root} ({len(data.subjects)} subjects)")
    print("Correlation of each subject's +keyed and -keyed item means, values as stored:")
    for trait, r in corr.items():
        print(f"  {trait}: {r:+.2f}")
    kind = verdict(corr)
    explain = {
        "keyed": "negatively keyed answers are stored reverse-scored: use protocol.coding=keyed "
        "(raw answer = 6 - v; protocol=clean, the default, uses it)",
        "as_stored": "negatively keyed answers are stored raw: use protocol.coding=as_stored "
        "(protocol=paper uses it; with protocol=clean add protocol.coding=as_stored)",
        "mixed": "the traits disagree: the coding cannot be told from these data",
    }[kind]
    print(f"Verdict: {kind}: {explain}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
