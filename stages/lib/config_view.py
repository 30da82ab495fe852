"""A read-only view of the config that lets a stage read only the paths its spec declares.

A stage's cache key holds the config it declares; a read of anything else would make the cached artifact
depend on a value the cache does not see. The view turns such a read into an error in the stage's own tests
(naming the stage and the key), and refuses writes, so a stage cannot change what later stages see.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterable


class ConfigAccessError(RuntimeError):
    """A stage read a config key its spec does not declare, or wrote one: a bug in the stage, so a traceback."""


def _frozen(value: Any) -> Any:
    """Lists become tuples and dicts read-only mappings, so a stage cannot edit the config through them."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


class ConfigView:
    """``view.section.key`` like the pydantic config, limited to ``allowed`` dotted paths.

    ``allowed`` holds sections ("distill") or single keys ("run.seed"); a section grants all its keys.
    """

    __slots__ = ("_obj", "_allowed", "_owner", "_prefix")

    def __init__(self, obj: Any, allowed: Iterable[str], owner: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", frozenset(allowed))
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_prefix", prefix)

    def _path(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def _whole(self, path: str) -> bool:
        """``path`` or one of its parents is declared: everything under it may be read."""
        parts = path.split(".")
        return any(".".join(parts[:i]) in self._allowed for i in range(1, len(parts) + 1))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        path = self._path(name)
        partly = any(a.startswith(path + ".") for a in self._allowed)
        if not (self._whole(path) or partly):
            raise ConfigAccessError(
                f"stage {self._owner!r} read config key {path!r}, which its spec does not declare; add it to the "
                f"stage's config (if it changes the artifacts) or runtime_config in pipeline/graph.py")
        value = getattr(self._obj, name)
        if hasattr(type(value), "model_fields"):  # a pydantic section: keep filtering below it
            return ConfigView(value, self._allowed, self._owner, path)
        return _frozen(value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise ConfigAccessError(f"stage {self._owner!r} tried to set config key {self._path(name)!r}; the config is "
                            "read-only inside a stage")

    __delattr__ = __setattr__  # type: ignore[assignment]

    def model_dump(self, **kwargs: Any) -> dict:
        """The section as data, only when the whole of it is declared (a partial dump would read undeclared keys)."""
        if not self._whole(self._prefix or "\0"):
            raise ConfigAccessError(f"stage {self._owner!r} dumped config section {self._prefix or '<all>'!r}, "
                                       "which its spec declares only in part")
        return self._obj.model_dump(**kwargs)

    def __repr__(self) -> str:
        return f"ConfigView({self._owner!r}, {self._prefix or '<root>'}, allowed={sorted(self._allowed)})"
