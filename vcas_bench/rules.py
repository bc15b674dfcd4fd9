"""What one setting accepts, and the one-line message when a value is not that.

A :class:`Rule` is a type (integer, number, flag, choice, directory, text), an optional range, and
what ``null`` means for the setting (``None``: null is refused). Its message always has the form
``<key>=<value>: must be <what is allowed>``, e.g.
``model.optim.max_grad_norm=-1: must be a number > 0 or null (null: no clipping)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Rule", "choice", "directory", "existing_path", "flag", "integer", "number", "show", "text", "type_rule",
]

KIND_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "flag": "true or false",
    "directory": "an existing directory",
    "path": "an existing file or directory",
    "text": "a string",
}


@dataclass(frozen=True)
class Rule:
    kind: str  # integer | number | flag | choice | directory | path | text
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # low itself is refused (> low)
    open_high: bool = False  # high itself is refused (< high)
    choices: tuple[str, ...] = ()
    null: str | None = None  # what null means for this setting; None: null is refused

    def problem(self, key: str, value: Any) -> str | None:
        """The message for ``key=value``, or None when the value is allowed."""
        if value is None:
            return None if self.null is not None else self.message(key, value)
        return None if self.accepts(value) else self.message(key, value)

    def message(self, key: str, value: Any) -> str:
        return f"{key}={show(value)}: must be {self.allowed()}"

    def accepts(self, value: Any) -> bool:
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.choices
        if self.kind in ("text", "directory", "path"):
            return isinstance(value, str) and self._names_what_exists(Path(value).expanduser())
        numeric = isinstance(value, int) if self.kind == "integer" else isinstance(value, (int, float))
        if not numeric or isinstance(value, bool) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def _names_what_exists(self, path: Path) -> bool:
        if self.kind == "directory":
            return path.is_dir()
        return self.kind == "text" or path.exists()

    def allowed(self) -> str:
        what = "one of " + ", ".join(self.choices) if self.kind == "choice" else KIND_NAMES[self.kind]
        return what + self._range() + (f" or null ({self.null})" if self.null is not None else "")

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f" in {left}{show(self.low)}, {show(self.high)}{right}"
        if self.low is not None:
            return f" {'>' if self.open_low else '>='} {show(self.low)}"
        if self.high is not None:
            return f" {'<' if self.open_high else '<='} {show(self.high)}"
        return ""


def integer(low: int | None = None, high: int | None = None, null: str | None = None) -> Rule:
    return Rule("integer", low, high, null=null)


def number(
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    null: str | None = None,
) -> Rule:
    return Rule("number", low, high, open_low, open_high, null=null)


def choice(*choices: str, null: str | None = None) -> Rule:
    return Rule("choice", choices=choices, null=null)


def flag(null: str | None = None) -> Rule:
    return Rule("flag", null=null)


def directory(null: str | None = None) -> Rule:
    return Rule("directory", null=null)


def existing_path(null: str | None = None) -> Rule:
    """A file or a folder (a weights file, or a checkpoint folder holding one)."""
    return Rule("path", null=null)


def text(null: str | None = None) -> Rule:
    return Rule("text", null=null)


TYPE_NAMES = {"int": "integer", "float": "number", "bool": "flag", "str": "text"}


def type_rule(annotation: Any) -> Rule | None:
    """The type-only rule of a builder argument annotated ``int``, ``float | None``, ... (None: unknown)."""
    names = [part.strip() for part in str(annotation).split("|")]
    kinds = [TYPE_NAMES.get(name) for name in names if name != "None"]
    if len(kinds) != 1 or kinds[0] is None:
        return None
    return Rule(kinds[0], null="the default" if "None" in names else None)


def show(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # Hydra reads `lr=-1` into a float field as -1.0
    return str(value)
