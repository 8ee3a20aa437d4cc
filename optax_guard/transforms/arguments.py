"""Checks of the public arguments, run when a transformation is built.

A value of the wrong type raises ``TypeError`` and one out of range
``ValueError``; both name the argument, the value and what is accepted.
``bool`` is not a number here (``True`` is no count of steps), and NaN or
infinity is no threshold unless a check says so.

Examples:
  >>> from optax_guard.transforms import arguments
  >>> arguments.real('sigma', float('inf'), low=0)
  Traceback (most recent call last):
  ...
  ValueError: sigma must be a finite float > 0, got inf.
"""

import math
import numbers
from typing import Any

import jax
import numpy as np
import optax


def _number(value: Any, integral: bool) -> Any:
  """``value`` as a Python number, ``_TRACED``, or ``None`` if it is none.

  Python and NumPy scalars and 0-d arrays of a real dtype count (``bool``
  does not); a traced value (a hyperparameter injected under ``jit``) cannot
  be checked and passes.
  """
  kinds = 'iu' if integral else 'iuf'
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, numbers.Integral if integral else numbers.Real):
    return value
  dtype = getattr(value, 'dtype', None)
  if dtype is None or np.shape(value) != () or np.dtype(dtype).kind not in kinds:
    return None
  if isinstance(value, jax.core.Tracer):
    return _TRACED
  return np.asarray(value).item()


_TRACED = object()


def real(name: str, value: Any, *, low: float | None = None,
         high: float | None = None, low_open: bool = True,
         high_open: bool = True, allow_none: bool = False) -> None:
  """``value`` is a finite real number in the range given (or ``None``).

  Args:
    name: the argument's name, for the message.
    value: what was passed.
    low: the lower bound, if any.
    high: the upper bound, if any.
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.
    allow_none: whether ``None`` is accepted.

  Raises:
    TypeError: not a real number (``bool`` included).
    ValueError: NaN, infinite or out of range.
  """
  if value is None and allow_none:
    return
  bounds = []
  if low is not None:
    bounds.append(f'{">" if low_open else ">="} {low:g}')
  if high is not None:
    bounds.append(f'{"<" if high_open else "<="} {high:g}')
  accepted = 'a finite float' + (' ' if bounds else '') + ' and '.join(bounds)
  if allow_none:
    accepted = f'None or {accepted}'
  number = _number(value, integral=False)
  if number is None:
    raise TypeError(
        f'{name} must be {accepted}, got {value!r} ({type(value).__name__}).')
  if number is _TRACED:
    return
  value = float(number)
  out_of_range = (
      not math.isfinite(value)
      or (low is not None and (value <= low if low_open else value < low))
      or (high is not None and (value >= high if high_open else value > high)))
  if out_of_range:
    raise ValueError(f'{name} must be {accepted}, got {value!r}.')


def count(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False,
          hint: str = '') -> None:
  """``value`` is an ``int >= minimum`` (or ``None``); ``hint`` ends the
  message."""
  if value is None and allow_none:
    return
  accepted = f'{"None or " if allow_none else ""}an int >= {minimum}'
  number = _number(value, integral=True)
  if number is None:
    raise TypeError(
        f'{name} must be {accepted}, got {value!r} ({type(value).__name__})'
        f'.{hint}')
  if number is not _TRACED and number < minimum:
    raise ValueError(f'{name} must be {accepted}, got {value!r}.{hint}')


def flag(name: str, value: Any) -> None:
  """``value`` is a ``bool`` (not a string, not a number)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(
        f'{name} must be True or False, got {value!r}'
        f' ({type(value).__name__}).')


def choice(name: str, value: Any, options: tuple[str, ...]) -> None:
  """``value`` is one of ``options``."""
  if not isinstance(value, str):
    raise TypeError(f'{name} must be one of {options}, got {value!r}.')
  if value not in options:
    raise ValueError(f'{name} must be one of {options}, got {value!r}.')


def transformation(name: str, value: Any, *, allow_none: bool = False,
                   example: str = 'optax.adam(1e-3)') -> None:
  """``value`` is an optax transformation (``init`` and ``update``)."""
  if value is None and allow_none:
    return
  if not (isinstance(value, optax.GradientTransformation) or (
      callable(getattr(value, 'init', None))
      and callable(getattr(value, 'update', None)))):
    raise TypeError(
        f'{name} must be {"None or " if allow_none else ""}an optax'
        f' GradientTransformation (e.g. {example}), got {value!r}.')
