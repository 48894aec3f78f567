"""Rebuilding the pieces a model is given (objective, constraints, likelihood) from a checkpoint.

A Lightning checkpoint holds the tensors and the hyperparameters a model was built with; the
pieces handed to a model as modules are not hyperparameters ``save_hyperparameters`` can
store. Each of the library's pieces is :class:`Rebuildable`: it states the arguments it was
built with (:meth:`Rebuildable.init_args`), :func:`piece_config` writes them in the
``{"class_path", "init_args"}`` form LightningCLI configs use (so a checkpoint reads like the
config that made it), and :func:`instantiate` builds the piece again. Their tensors (a learned
sigma, GECO's lambda and moving average) come back from the state dict as usual.

A piece that does not state its arguments (a user's own class) is recorded by class path
alone; loading such a checkpoint asks for the piece to be passed instead of guessing it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["NotRebuildableError", "Rebuildable", "instantiate", "piece_config"]


class NotRebuildableError(ValueError):
    """A checkpoint's piece cannot be built again from what the checkpoint recorded."""


class Rebuildable:
    """Mixin of a piece a checkpoint can rebuild: it states the arguments it was built with."""

    def init_args(self) -> dict[str, Any]:
        """The constructor's arguments, by name, as this piece was built.

        Default: the attribute named like each ``__init__`` parameter. A class that keeps an
        argument under another name (or converted) overrides this; a test rebuilds every piece
        of the library and compares.
        """
        init = type(self).__init__
        if init is nn.Module.__init__:  # no constructor of its own: built with no arguments
            return {}
        parameters = [p for p in inspect.signature(init).parameters.values() if p.name != "self"]
        passed_on = [("**" if p.kind == p.VAR_KEYWORD else "*") + p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if passed_on:
            # What went through *args / **kwargs is not recorded: rebuilt from the named ones
            # alone, the piece would come back with its parent's defaults, silently.
            raise NotRebuildableError(
                f"{_class_path(self)} takes {' and '.join(passed_on)}, whose arguments are not recorded: name each "
                "argument in __init__, or override init_args() to state the arguments it was built with."
            )
        missing = [p.name for p in parameters if not hasattr(self, p.name)]
        if missing:
            raise NotRebuildableError(
                f"{_class_path(self)} keeps no attribute for its argument(s) {missing}: override init_args() "
                "to state the arguments it was built with."
            )
        return {p.name: getattr(self, p.name) for p in parameters}


def _class_path(piece: object) -> str:
    return f"{type(piece).__module__}.{type(piece).__qualname__}"


def _plain(value: Any) -> Any:
    """An argument as plain data: pieces as configs, sequences as lists, tensors as lists."""
    if isinstance(value, Rebuildable):
        return piece_config(value, strict=True)
    if isinstance(value, nn.Module):
        raise NotRebuildableError(f"{_class_path(value)} does not state its arguments (it is not Rebuildable).")
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise NotRebuildableError(f"an argument of type {type(value).__name__} cannot be written to a checkpoint: {value!r}.")


def piece_config(piece: object, strict: bool = False) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` of a piece, nested pieces included.

    A piece that cannot state its arguments gives ``{"class_path": ...}`` alone (or, with
    ``strict``, raises :class:`NotRebuildableError`).
    """
    try:
        if not isinstance(piece, Rebuildable):
            raise NotRebuildableError(f"{_class_path(piece)} does not state its arguments (it is not Rebuildable).")
        return {"class_path": _class_path(piece), "init_args": {k: _plain(v) for k, v in piece.init_args().items()}}
    except NotRebuildableError:
        if strict:
            raise
        return {"class_path": _class_path(piece)}


def _is_config(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_path" in value


def instantiate(config: Mapping[str, Any], what: str = "piece") -> Any:
    """Build a piece from :func:`piece_config`'s dict (nested configs are built first).

    Args:
        config: ``{"class_path": "module.Class", "init_args": {...}}``.
        what: the argument the piece is for (``"objective"``), named in errors.

    Raises:
        NotRebuildableError: the config has no ``init_args`` (the piece did not state them),
            its class cannot be imported, or it is not a :class:`Rebuildable` class (a checkpoint
            naming any other callable, ``os.system``, is refused before it is called).
    """
    class_path = str(config["class_path"])
    if "init_args" not in config:
        raise NotRebuildableError(
            f"The checkpoint records the {what} as {class_path}, which does not state the arguments it was built "
            f"with, so it cannot be rebuilt. Pass it when loading: load_from_checkpoint(path, {what}=...)."
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise NotRebuildableError(
            f"The checkpoint's {what} is {class_path}, which cannot be imported here ({error}). Install the code "
            f"that defines it, or pass the {what} when loading: load_from_checkpoint(path, {what}=...)."
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, Rebuildable)):
        # A checkpoint is data: calling whatever it names (os.system with a command) would run it.
        raise NotRebuildableError(
            f"The checkpoint's {what} is {class_path}, which is not a Rebuildable piece (an objective, constraint, "
            f"likelihood or frozen network), so it is not built from the file. Pass the {what} when loading: "
            f"load_from_checkpoint(path, {what}=...)."
        )

    def built(value: Any) -> Any:
        if _is_config(value):
            return instantiate(value, what)
        if isinstance(value, list):
            return [built(v) for v in value]
        return value

    return cls(**{name: built(value) for name, value in dict(config["init_args"] or {}).items()})
