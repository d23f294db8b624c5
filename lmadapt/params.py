"""Valid ranges of numeric parameters, and the one value parser of the CLI.

Every numeric setting (training config, model config, method hyper-parameters,
classifier flags, plain CLI integers) is checked here, where it is parsed, so a
bad value fails at once with one line naming it instead of deep inside a long
run (or, worse, giving a NaN perplexity with exit 0).

A dataclass declares its ranges in a class attribute `RANGES` (name -> Range);
a numeric field without a declared range must still be finite. Ints must be
whole numbers: `1e999` or `inf` for an integer setting is refused, not
truncated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lmadapt.errors import LmadaptError

# The largest integer any setting may take: far above any real size, small enough that
# no allocation is attempted from a typo such as 1e30.
MAX_INT = 2**40


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False     # lo itself is excluded
    hi_open: bool = False     # hi itself is excluded

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "finite"

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        if self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)):
            return False
        return True


def at_least(x: float) -> Range:
    return Range(lo=x)


def above(x: float) -> Range:
    return Range(lo=x, lo_open=True)


def between(lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False) -> Range:
    return Range(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
PROBABILITY = between(0, 1)
ANY = Range()


def check_number(name: str, value: Any, rng: Range | None = None) -> Any:
    """Raise LmadaptError unless `value` is a finite number in `rng` (ints also <= MAX_INT)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # not a number: the type check happens where the value is coerced
    if isinstance(value, float) and not math.isfinite(value):
        raise LmadaptError(f"{name} must be a finite number, got {value}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise LmadaptError(f"{name} is unreasonably large: {value}")
    rng = rng or ANY
    if not rng.contains(value):
        raise LmadaptError(f"{name} must be {rng.describe()}, got {value:g}")
    return value


def check_fields(obj: Any, prefix: str) -> None:
    """Check every numeric field (and each number of a tuple field) of a dataclass instance
    against its class's RANGES; `prefix` names it in the message (e.g. 'train.' or '--mbpa-')."""
    ranges = getattr(type(obj), "RANGES", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        label = f"{prefix}{f.name.replace('_', '-') if prefix.startswith('--') else f.name}"
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            check_number(label, v, ranges.get(f.name))


def to_float(text: Any, name: str) -> float:
    """A finite float from a string or number."""
    try:
        x = float(text)
    except (TypeError, ValueError, OverflowError):
        raise LmadaptError(f"{name} expects a number, got {text!r}") from None
    if not math.isfinite(x):
        raise LmadaptError(f"{name} must be a finite number, got {text}")
    return x


def to_int(text: Any, name: str) -> int:
    """An integer from a string or number; '3.0' and 3.0 are 3, '3.5', 'inf', 'nan' are refused."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        x = to_float(text, name)
    except LmadaptError as exc:
        raise LmadaptError(str(exc).replace("a number", "an integer").replace("finite number", "finite integer")) \
            from None
    if x != int(x):
        raise LmadaptError(f"{name} expects an integer, got {text!r}")
    return int(x)


def arg(kind: type, rng: Range | None = None):
    """An argparse `type=` for a plain numeric flag: parsed and range-checked here, so a bad
    value ends in argparse's one-line usage error (exit 2)."""

    def parse(text: str):
        try:
            value = to_int(text, "value") if kind is int else to_float(text, "value")
            check_number("value", value, rng)
        except LmadaptError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("value ", "", 1)) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def numbers(text: str, flag: str, kind: type = float, rng: Range | None = None) -> tuple:
    """Comma-separated numbers of one type, each finite and in `rng`."""
    parts = [v.strip() for v in str(text).split(",") if v.strip()]
    if not parts:
        raise LmadaptError(f"{flag} is empty")
    convert = to_int if kind is int else to_float
    return tuple(check_number(flag, convert(v, flag), rng) for v in parts)


def to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise LmadaptError(f"{name} expects true or false, got {value!r}")


def parse_value(value: Any, kind: type, name: str, rng: Range | None = None, choices=None, many: bool = False):
    """A setting of type `kind` (bool, int, float or str) from text or a number, checked
    against `rng` (numbers) or `choices` (text); `many`: a comma-separated list of them."""
    if many:
        parts = list(value) if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",")]
        parts = [v for v in parts if v != ""]
        if not parts:
            raise LmadaptError(f"{name} is empty")
        return tuple(parse_value(v, kind, name, rng, choices) for v in parts)
    if kind is bool:
        return to_bool(value, name)
    if kind is int or kind is float:
        if isinstance(value, bool):
            raise LmadaptError(f"{name} expects a number, got {value!r}")
        return check_number(name, (to_int if kind is int else to_float)(value, name), rng)
    text = str(value)
    if choices and text not in choices:
        raise LmadaptError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text


def field_kind(f: dataclasses.Field) -> tuple[type | None, bool]:
    """(bool | int | float | str, is a tuple of them) from a dataclass field's annotation;
    (None, False) for any other type (e.g. a nested dataclass)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "")
    many = t.startswith("tuple[") and t.endswith(",...]")
    base = t[len("tuple["):-len(",...]")] if many else t
    kind = {"bool": bool, "int": int, "float": float, "str": str}.get(base)
    return kind, many and kind is not None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def flag_name(prefix: str, name: str) -> str:
    return f"{prefix}{name.replace('_', '-')}"


def add_flags(parser, cls: type, key: str, *, prefix: str = "--", only=None, defaults=None) -> None:
    """A flag `PREFIX-FIELD` for each plain field of dataclass `cls` (or those in `only`).

    Values stay text until `read_flags` parses them (one parser, `parse_value`, with the
    field's type, its class's `RANGES` and `CHOICES`), so a bad value is an LmadaptError
    naming the flag.  A tuple field takes a comma-separated list.  A boolean field takes
    an optional true/false (the bare flag means true); one that defaults to true also
    gets `--no-FIELD`.  `defaults`: an instance whose values the help text shows; the
    class's `HELP` (name -> text) describes a field.
    """
    choices, helps = getattr(cls, "CHOICES", {}), getattr(cls, "HELP", {})
    for f in dataclasses.fields(cls):
        kind, many = field_kind(f)
        if kind is None or (only is not None and f.name not in only):
            continue
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        flag, dest = flag_name(prefix, f.name), f"{key}__{f.name}"
        shown = ",".join(map(str, default)) if many else default
        extra = f"; one of {', '.join(choices[f.name])}" if f.name in choices else ""
        text = f"{helps[f.name]} " if f.name in helps else ""
        if kind is bool:
            parser.add_argument(flag, dest=dest, nargs="?", const="true", default=None, metavar="BOOL",
                                help=f"{text}(default {str(default).lower()})")
            if default:
                parser.add_argument(flag_name(prefix, "no_" + f.name), dest=dest, action="store_const", const="false",
                                    help=f"the same as {flag} false")
        else:
            metavar = (kind.__name__.upper() + ",...") if many else kind.__name__.upper()
            parser.add_argument(flag, dest=dest, default=None, metavar=metavar, help=f"{text}(default {shown}{extra})")


def read_flags(args, cls: type, key: str, base, *, prefix: str = "--"):
    """`base` (an instance of `cls`) with the values given to the flags of `add_flags`."""
    ranges, choices = getattr(cls, "RANGES", {}), getattr(cls, "CHOICES", {})
    values = {}
    for f in dataclasses.fields(cls):
        text = getattr(args, f"{key}__{f.name}", None)
        if text is None:
            continue
        kind, many = field_kind(f)
        values[f.name] = parse_value(text, kind, flag_name(prefix, f.name), ranges.get(f.name), choices.get(f.name), many)
    return dataclasses.replace(base, **values)


def check_choices(obj: Any, prefix: str) -> None:
    """Each text field of a dataclass instance (or each item of a tuple one) in its class's CHOICES."""
    for name, allowed in getattr(type(obj), "CHOICES", {}).items():
        value = getattr(obj, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v not in allowed:
                raise LmadaptError(f"{flag_name(prefix, name)} must be one of {', '.join(allowed)}, got {v!r}")
