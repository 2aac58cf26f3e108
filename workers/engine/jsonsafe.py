"""One bounded JSON reader for everything a user uploads or points at: model configs, class lists, SAE configs
(ours and SAELens'), WebDataset ``.json`` members, manifests and form fields.

``json.loads`` alone answers some inputs with errors nobody catches: an integer of more than 4 300 digits raises
a plain ``ValueError`` (Python's int-string limit), ``[[[[...`` a ``RecursionError``; and it accepts ``NaN``,
``Infinity`` and floats that overflow to infinity, which no config means. Here each of these is a
``JSONLimitError`` (a ``ValueError``) whose message says what is wrong and what to send instead.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

# the most digits an integer may have: far more than any size, count or seed needs, far below the int-string limit
MAX_INT_DIGITS = int(os.environ.get("JSON_MAX_INT_DIGITS", "100"))


class JSONLimitError(ValueError):
    """JSON that cannot be read: malformed, or over a bound. The message names the input and the fix."""


def _parse_int(what: str):
    def parse(text: str) -> int:
        digits = len(text.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            raise JSONLimitError(f"{what}: a number of {digits} digits; numbers here may have at most "
                                 f"{MAX_INT_DIGITS} digits")
        return int(text)
    return parse


def _parse_float(what: str):
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise JSONLimitError(f"{what}: the number {text[:40]}{'...' if len(text) > 40 else ''} is too large "
                                 "to be a finite float; send a finite number")
        return value
    return parse


def _parse_constant(what: str):
    def parse(text: str) -> float:
        raise JSONLimitError(f"{what}: {text} is not a number JSON allows; send a finite number")
    return parse


def loads(data: str | bytes | bytearray, what: str = "the JSON") -> Any:
    """The value of JSON ``data``; raises JSONLimitError naming ``what`` when it is not valid UTF-8 or JSON, is
    nested too deeply, holds an integer of more than MAX_INT_DIGITS digits, or a non-finite number."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONLimitError(f"{what} is not UTF-8 text: {exc}") from None
    try:
        return json.loads(data, parse_int=_parse_int(what), parse_float=_parse_float(what),
                          parse_constant=_parse_constant(what))
    except JSONLimitError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise JSONLimitError(f"{what} is nested too deeply; send at most a few hundred levels of arrays and "
                             "objects") from None
    except ValueError as exc:  # anything else json.loads raises on its input
        raise JSONLimitError(f"{what} cannot be read: {exc}") from None
