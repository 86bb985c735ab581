"""Inner cross-validation splits by section, with one policy for sections too small to be scored (no torch here).

A held-out fold of one spot has no R² or Pearson (sklearn returns NaN), and a few spots give a score so noisy that
it outweighs every other fold in the mean. Every inner cross-validation of histoexp (ridge's penalty, and any model
selection added later) takes its splits from :func:`leave_one_section_out`, so they all treat small sections alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._settings import logger

__all__ = ["MIN_FOLD_SPOTS", "SectionSplits", "leave_one_section_out"]

#: fewest spots a held-out fold of an inner cross-validation may have
MIN_FOLD_SPOTS = 10


@dataclass
class SectionSplits:
    """Leave-one-section-out splits of an inner cross-validation.

    Attributes
    ----------
    folds
        ``(train rows, test rows)`` per fold (sklearn's ``cv=`` accepts the list), or ``None`` when fewer than two
        folds can be held out (the caller falls back, e.g. to leave-one-out over spots).
    held_out
        Fold names, in order: a section, or ``'pooled:<a>+<b>+...'`` for small sections held out together.
    pooled
        Small sections held out together in one fold.
    train_only
        Small sections never held out (too few spots even pooled); they stay on the training side of every fold.
    description
        One line for ``params``: ``'leave-one-section-out'``, with what was done with small sections in brackets.
    """

    folds: list[tuple[np.ndarray, np.ndarray]] | None
    held_out: list[str] = field(default_factory=list)
    pooled: list[str] = field(default_factory=list)
    train_only: list[str] = field(default_factory=list)
    description: str = ""


def leave_one_section_out(
    groups, *, min_spots: int = MIN_FOLD_SPOTS, purpose: str = "the inner cross-validation", warn: bool = True
) -> SectionSplits:
    """Leave-one-section-out splits in which every held-out fold has at least ``min_spots`` spots.

    Sections with ``min_spots`` or more spots are held out one at a time. Smaller ones are held out together in
    one pooled fold when they reach ``min_spots`` together; otherwise they are never held out and stay on the
    training side of every fold. With fewer than two folds, ``folds`` is ``None``. What was done with small
    sections is logged as a warning (``warn``) and said in ``description``.

    Parameters
    ----------
    groups
        Section label of each training spot.
    min_spots
        Fewest spots of a held-out fold.
    purpose
        What the splits are for, in the warning (e.g. ``'ridge alpha'``).
    warn
        Log the small-section handling.

    Returns
    -------
    The :class:`SectionSplits`.
    """
    groups = np.asarray(groups).astype(str)
    names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    big = [i for i in range(len(names)) if counts[i] >= min_spots]
    small = [i for i in range(len(names)) if counts[i] < min_spots]
    test_sets = [(str(names[i]), [i]) for i in big]
    pooled, train_only = [], []
    if small:
        if counts[small].sum() >= min_spots:
            pooled = [str(names[i]) for i in small]
            test_sets.append(("pooled:" + "+".join(pooled), small))
        else:
            train_only = [str(names[i]) for i in small]
    if len(test_sets) < 2:
        folds, what = None, f"fewer than two folds of >= {min_spots} spots"
    else:
        rows = np.arange(len(groups))
        folds = []
        for _, members in test_sets:
            test = np.isin(inverse, members)
            folds.append((rows[~test], rows[test]))
        what = f"{len(folds)} folds"
    notes = []
    if pooled:
        notes.append(f"sections {pooled} (< {min_spots} spots each) held out together")
    if train_only:
        notes.append(f"sections {train_only} (< {min_spots} spots even together) never held out")
    description = "leave-one-section-out" + (f" ({what}; {'; '.join(notes)})" if notes else "")
    if warn and (small or folds is None) and len(names) > 1:
        sizes = {str(names[i]): int(counts[i]) for i in small}
        logger.warning(
            "%s: sections with fewer than %d spots %s cannot be scored alone: %s.",
            purpose,
            min_spots,
            sizes,
            "; ".join(notes) if folds is not None else what + ", so sections are not used as folds",
        )
    return SectionSplits(
        folds=folds,
        held_out=[name for name, _ in test_sets] if folds is not None else [],
        pooled=pooled,
        train_only=train_only,
        description=description,
    )
