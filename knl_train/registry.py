"""``Registry``: names to builders, filled by a ``register(name)`` decorator (models, optimizers)."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, Mapping, Tuple, TypeVar

from knl_train import yamlconfig

Builder = TypeVar("Builder", bound=Callable)


class Registry(Mapping[str, Builder]):
    """A read-only mapping of name to builder; ``register(name)`` adds one, once per name."""

    def __init__(self, kind: str):
        self.kind = kind  # what a name names, for errors: "model", "optimizer"
        self._builders: Dict[str, Builder] = {}

    def register(self, name: str) -> Callable[[Builder], Builder]:
        def add(builder: Builder) -> Builder:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder
        return add

    def __getitem__(self, name: str) -> Builder:
        return self._builders[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def names(self) -> Tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._builders))

    def describe(self) -> Dict[str, str]:
        """Each name with the first line of its builder's docstring."""
        return {name: _first_line(self._builders[name].__doc__) for name in self.names()}

    def lookup(self, name: str) -> Builder:
        """The builder registered as ``name``; a UserError names the closest and lists all."""
        if name not in self._builders:
            raise yamlconfig.unknown(self.kind, name, self._builders)
        return self._builders[name]

    def check_names(self, expected: Iterable[str]) -> None:
        """Fail unless exactly the names ``expected`` (a list kept elsewhere) are registered."""
        expected = set(expected)
        if set(self._builders) != expected:
            raise RuntimeError(
                f"the {self.kind} registry holds {', '.join(self.names())} but the list of "
                f"{self.kind} names has {', '.join(sorted(expected))}; register or list the difference")


def _first_line(doc) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


__all__ = ["Registry"]
