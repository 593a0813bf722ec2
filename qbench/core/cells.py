"""A cell's identity: which backend, which variant, which settings.

The one grammar of the text users write (``-b``, ``--baseline``, a suite's
``backends``), parsed here and nowhere else:

    backend:variant                  a named variant          bnb:nf4
    backend:variant:key=value,...    a named variant, changed bnb:nf4:compute_dtype=bf16
    backend:key=value,...            settings from defaults   torchao:bits=4,group_size=64

A value may hold a colon (``granularity=group:32``): the variant name is the
text before the first colon only when that text has no ``=``.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, computed_field, model_validator

from qbench.core.errors import QBenchError


def parse_variant(text: str) -> tuple[Optional[str], dict[str, str]]:
    """``"nf4"`` -> ("nf4", {}); ``"nf4:compute_dtype=bf16"`` -> ("nf4",
    {"compute_dtype": "bf16"}); ``"bits=4,group_size=64"`` -> (None, {...})."""
    text = text.strip()
    head, colon, rest = text.partition(":")
    if colon and "=" not in head:
        name, given = head.strip(), rest
    elif "=" in text:
        name, given = None, text
    else:
        name, given = text, ""
    if name is not None and not name:
        raise QBenchError(f"variant '{text}' has no name before its settings: write NAME:key=value or key=value")
    settings: dict[str, str] = {}
    if colon and name is not None and not given.strip():
        raise QBenchError(f"variant '{text}' ends in ':' with no settings after it: write {name}:key=value or {name}")
    for part in given.split(",") if given else ():
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise QBenchError(f"bad setting '{part}' in variant '{text}': expected key=value")
        settings[key.strip()] = value.strip()
    return name, settings


def variant_text(variant: Optional[str], settings: dict[str, str]) -> str:
    """The inverse of ``parse_variant``."""
    given = ",".join(f"{key}={value}" for key, value in settings.items())
    return f"{variant}:{given}" if variant and given else (variant or given)


class CellSpec(BaseModel):
    """One cell of a plan: ``backend``, the named ``variant`` it starts from
    (None: the backend's defaults), the ``settings`` given on top, and whether
    it is the run's baseline. Its text, ``cell``, keys the cell's records."""

    model_config = ConfigDict(frozen=True)

    backend: str
    variant: Optional[str] = None
    settings: dict[str, str] = {}
    baseline: bool = False

    @classmethod
    def parse(cls, text: str, baseline: bool = False) -> CellSpec:
        """``backend:variant[:key=value,...]`` or ``backend:key=value,...``."""
        backend, colon, rest = text.strip().partition(":")
        if not colon or not backend.strip() or not rest.strip():
            raise QBenchError(
                f"'{text}' names no variant: write backend:variant (e.g. bnb:nf4) or backend:key=value,..."
            )
        variant, settings = parse_variant(rest)
        return cls(backend=backend.strip(), variant=variant, settings=settings, baseline=baseline)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cell(self) -> str:
        return f"{self.backend}:{self.variant_text}"

    @property
    def variant_text(self) -> str:
        """What follows ``backend:`` in ``cell`` (the records' ``variant``)."""
        return variant_text(self.variant, self.settings)

    @model_validator(mode="before")
    @classmethod
    def _from_plan_text(cls, data: Any) -> Any:
        # plans written before the settings were parsed once held the text
        # ({"cell", "backend", "variant": "nf4:compute_dtype=bf16"})
        if isinstance(data, dict) and "settings" not in data and isinstance(data.get("variant"), str):
            variant, settings = parse_variant(data["variant"])
            data = {**data, "variant": variant, "settings": settings}
        if isinstance(data, dict):
            data = {key: value for key, value in data.items() if key != "cell"}
        return data
