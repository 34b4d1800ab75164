"""Format labels for rollouts: the `format` column when the trainer wrote one, else classification.

Classification is `specialists.formats.classify` (the first format whose anchored pattern fully matches
the generation, else `other`), run once per distinct completion: RL samples repeat themselves, the more
so as a policy collapses.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from specialists.formats import OTHER, Format, classify


def format_names(formats: tuple[Format, ...], labels: pd.Series) -> list[str]:
    """The categories of the analysis: the set's formats in order, then names the trainer wrote that the set
    lacks (sorted), then `other`."""
    known = [fmt.name for fmt in formats]
    extra = sorted(set(labels.dropna().unique()) - set(known) - {OTHER})
    return known + extra + [OTHER]


def label_formats(table: pd.DataFrame, formats: tuple[Format, ...]) -> pd.Series:
    """Format name per row: the given `format` where present, else the classification of `completion`."""
    missing = table["format"].isna().to_numpy()
    labels = table["format"].to_numpy(dtype=object).copy()
    if missing.any():
        codes, completions = pd.factorize(table["completion"].to_numpy(dtype=object)[missing])
        names = [classify(text, formats) for text in completions]
        labels[missing] = np.asarray(names, dtype=object)[codes]
    return pd.Series(labels, index=table.index, name="format", dtype=object)
