"""Argument checks shared by every constructor: one wording for each kind of bad value.

Each check returns the value in the form the caller stores (a ``float`` for an amount) or raises
a ``ValueError`` that names the argument, what it accepts and what it got, so that bad
configuration fails at construction, before any compute is spent.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from typing import Any, Literal, Optional, Union, overload


def is_number(value: Any) -> bool:
    """A real number that is not a bool: JSON and Python both accept ``True`` where a number is meant."""
    return isinstance(value, Real) and not isinstance(value, bool)


@overload
def check_amount(name: str, value: Any, minimum: float = ..., allow_none: Literal[False] = ..., strict: bool = ...,
                 why: str = ..., maximum: Optional[float] = ..., strict_maximum: bool = ...) -> float: ...
@overload
def check_amount(name: str, value: Any, minimum: float = ..., allow_none: bool = ..., strict: bool = ...,
                 why: str = ..., maximum: Optional[float] = ..., strict_maximum: bool = ...) -> Optional[float]: ...
def check_amount(name: str, value: Any, minimum: float = 0.0, allow_none: bool = False, strict: bool = False,
                 why: str = "", maximum: Optional[float] = None, strict_maximum: bool = False) -> Optional[float]:
    """A finite real number >= ``minimum`` (> with ``strict``), or a ValueError that names the argument.

    One check for every numeric argument, so each says the same thing when it is wrong; ``why``
    is appended to the bound's message where the bound needs explaining. ``maximum`` adds an
    upper bound (<=, or < with ``strict_maximum``).
    """
    if value is None and allow_none:
        return None
    bound = f"{'>' if strict else '>='} {minimum}"
    if maximum is not None:
        bound += f" and {'<' if strict_maximum else '<='} {maximum}"
    if not is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number {bound}{' or None' if allow_none else ''}, got {value!r}")
    if float(value) < minimum or (strict and float(value) == minimum):
        raise ValueError(f"{name} must be {bound}{why}, got {value!r}")
    if maximum is not None and (float(value) > maximum or (strict_maximum and float(value) == maximum)):
        raise ValueError(f"{name} must be {bound}{why}, got {value!r}")
    return float(value)


@overload
def check_count(name: str, value: Any, minimum: int = ..., allow_none: Literal[False] = ...) -> int: ...
@overload
def check_count(name: str, value: Any, minimum: int = ..., allow_none: bool = ...) -> Optional[int]: ...
def check_count(name: str, value: Any, minimum: int = 0, allow_none: bool = False) -> Optional[int]:
    """An int >= ``minimum`` (not a bool), or a ValueError that names the argument: counts, steps, batches."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_text(name: str, value: Any, accepted: str, allow_none: bool = True) -> Optional[str]:
    """A string (or None), or a ValueError naming the argument and ``accepted`` (e.g. "a GPU model such as 'H100'").

    Names and codes (a GPU model, a country, a cloud region) are read as text further on; a
    number given by mistake would otherwise fail there with an ``AttributeError``.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be {accepted}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_path(name: str, value: Any, allow_none: bool = True) -> Optional[Union[str, os.PathLike]]:
    """A path (a non-empty ``str`` or ``os.PathLike``) or None, or a ValueError that names the argument."""
    if value is None and allow_none:
        return None
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError(f"{name} must be a folder path (a non-empty str or pathlib.Path)"
                     f"{' or None' if allow_none else ''}, got {value!r}")



def check_flag(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0, 1 or "yes"), or a ValueError that names the argument."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
