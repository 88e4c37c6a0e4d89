"""A checkpoint together with the adapter of its family: what every stage that needs model semantics opens."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import Checkpoint
from .base import Adapter


@dataclass(frozen=True)
class Model:
    """An opened model: ``checkpoint`` streams the tensors, ``adapter`` knows where things live in them."""

    checkpoint: Checkpoint
    adapter: Adapter

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    @property
    def num_layers(self) -> int:
        return self.checkpoint.num_layers

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_model(source: str | os.PathLike, *, check: bool = True,
               announce: Callable[[str], None] | None = None) -> Model:
    """Open a model folder (or ``hf:org/name`` from the Hub, see :meth:`Checkpoint.open`) with its family's adapter.

    An architecture without an adapter raises :class:`UnsupportedArchitectureError`; with ``check`` the
    weights must also agree with the config (layer count, expert counts), else a one-line
    :class:`CheckpointError`.
    """
    from . import get_adapter

    ckpt = Checkpoint.open(source, announce=announce)
    adapter = get_adapter(ckpt.config)
    if check:
        adapter.check(ckpt)
    return Model(ckpt, adapter)
