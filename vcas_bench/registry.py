"""A name -> builder registry with a decorator, a factory and a one-line error (timm/lm-eval style)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class Registry:
    """Builders registered under unique names; ``create(name, **kwargs)`` calls one."""

    def __init__(self, kind: str, reserved: tuple[str, ...] = ()) -> None:
        """``reserved``: the factory's own parameter names, which no builder argument may take (a builder
        ``name=`` argument would collide with ``create_model(name, ...)``)."""
        self.kind = kind
        self.reserved = reserved
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            clashes = sorted(set(inspect.signature(builder).parameters) & set(self.reserved))
            if clashes:
                raise TypeError(f"{self.kind} builder {name!r} takes {', '.join(clashes)}, which the "
                                f"factory reserves for itself; rename the argument")
            self._builders[name] = builder
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise KeyError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}")
        return self._builders[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._builders
