"""labels.csv columns read as "the image shows it": a suspect named by its column, a correction along one.

Light at import (numpy only), so the web process checks a column when a request names it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .errors import EngineError

TRUE_VALUES, FALSE_VALUES = ("1", "true", "yes"), ("0", "false", "no", "")


def binary_column(metadata: Mapping[str, Sequence], column: str, what: str = "") -> np.ndarray:
    """[images] bool: a labels.csv column of 0/1 (or true/false, yes/no; empty counts as 0) read as "the image
    shows it"; a refusal that names the columns there are, or the values that are not 0/1. ``what``: what the
    column is asked for, for the refusal ("to name a suspect")."""
    if column not in metadata:
        known = ", ".join(sorted(metadata)) or "none"
        raise EngineError(f"labels.csv has no column {column!r} (its extra columns: {known})")
    values = [str(v).strip().lower() for v in metadata[column]]
    bad = sorted({v for v in values if v not in TRUE_VALUES + FALSE_VALUES})
    if bad:
        raise EngineError(f"column {column!r} must hold 0/1 (or true/false){' ' + what if what else ''}; it holds "
                          f"{', '.join(bad[:5])}")
    return np.array([v in TRUE_VALUES for v in values], dtype=bool)
