"""Stable split assignment from a file's sha256.

An image's split depends only on its own bytes and the fractions, so adding
files or re-running the job never moves an existing image between splits
(and exact duplicates always land together).
"""

from __future__ import annotations

from typing import Sequence

from preprocessing.tfrecords import SPLITS

UNASSIGNED = "unassigned"  # an input rejected before its bytes were read


def split_for(sha256_hex: str, fractions: Sequence[float]) -> str:
    """The split of a file whose sha256 hex digest is ``sha256_hex``."""
    position = int(sha256_hex[:16], 16) / float(1 << 64)
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction
        if position < edge:
            return split
    return next(split for split, fraction in reversed(list(zip(SPLITS, fractions))) if fraction > 0)
