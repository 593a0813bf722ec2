"""Mixed-precision recipes: a base variant plus per-layer overrides.

A recipe is a YAML file::

    backend: torchao
    base: int4-wo-g32              # a variant of the backend, or settings "bits=4,granularity=group:32"
    overrides:                     # the first override whose patterns match a layer decides it
      - match: model.layers.11.mlp.down_proj
        keep: true                 # left in full precision
      - match: ["*.down_proj", "*.v_proj"]
        use: int8-wo               # quantized with another variant's settings
    source: {...}                  # free-form provenance (what generated it), recorded as is

It is run as a cell like any variant, ``-b torchao:recipe=path.yaml``; the
SHA-256 of its canonical content (not its path) joins the artifact cache key
and the record, so editing the file makes a new artifact and moving it does
not.
"""

from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qbench.core.datafiles import read_text
from qbench.core.errors import QBenchError, describe_validation
from qbench.core.io import write_atomic
from qbench.core.untrusted import load_yaml


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: fnmatch patterns over linear layer names (``*.down_proj``, ``model.layers.3.*``)
    match: tuple[str, ...]
    #: leave the matched layers in full precision
    keep: bool = False
    #: quantize the matched layers with another variant (a name, or ``key=value,...`` settings)
    use: Optional[str] = None

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_action(self):
        if not self.match:
            raise ValueError("an override needs at least one 'match' pattern")
        if self.keep == (self.use is not None):
            raise ValueError(f"override for {list(self.match)} needs exactly one of 'keep: true' or 'use: VARIANT'")
        return self

    def matches(self, layer: str) -> bool:
        return any(fnmatchcase(layer, pattern) for pattern in self.match)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the backend whose variants it mixes; unset: whichever backend runs it
    #: (``-b BACKEND:recipe=PATH``), which refuses a recipe written for another
    backend: Optional[str] = None
    #: the variant every layer not matched by an override gets
    base: str
    overrides: list[Override] = []
    #: provenance, recorded as given (a sensitivity folder, the units kept ...)
    source: dict[str, Any] = Field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 of the canonical content that decides the bytes (backend,
        base, overrides; not ``source``): the same recipe hashes the same
        whatever its file's formatting, comments, path or provenance."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"source"}), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def decide(self, layer: str) -> Optional[Override]:
        """The override that decides ``layer`` (the first that matches), or None for the base."""
        return next((o for o in self.overrides if o.matches(layer)), None)

    def check_matches(self, layers: list[str]) -> list[str]:
        """The overrides against the model's linear layers. An override that
        matches no layer is an error naming the layer names closest to its
        patterns (a recipe that silently ran as its uniform base once passed
        for a mixed one); returns notes for what matched less than written:
        a pattern that matches nothing beside ones that do, and an override
        whose layers an earlier override already decided."""
        import difflib

        notes, decided = [], set()
        for number, override in enumerate(self.overrides, 1):
            matched = [layer for layer in layers if override.matches(layer)]
            if not matched:
                close = sorted(
                    {c for p in override.match for c in difflib.get_close_matches(p, layers, n=3, cutoff=0.0)}
                )[:3]
                raise QBenchError(
                    f"recipe override {number} ({', '.join(override.match)}) matches none of the "
                    f"model's {len(layers)} linear layers; closest names: {', '.join(close) or '-'} "
                    "(patterns are fnmatch over full names, e.g. '*.down_proj')"
                )
            for pattern in override.match:
                if not any(fnmatchcase(layer, pattern) for layer in layers):
                    notes.append(f"recipe override {number}: pattern '{pattern}' matches no layer")
            mine = [layer for layer in matched if layer not in decided]
            if len(mine) < len(matched):
                notes.append(
                    f"recipe override {number} matches {len(matched)} layers, of which "
                    f"{len(matched) - len(mine)} an earlier override decides (the first match wins)"
                )
            decided.update(matched)
        return notes

    def variants(self) -> set[str]:
        """Every variant the recipe names."""
        return {self.base} | {o.use for o in self.overrides if o.use is not None}

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=False)
        for override in data["overrides"]:
            override["match"] = list(override["match"])
            if not override["keep"]:
                del override["keep"]
            if override["use"] is None:
                del override["use"]
        if not data["source"]:
            del data["source"]
        return yaml.safe_dump(data, sort_keys=False, width=100)


def load_recipe(path: Union[str, Path]) -> Recipe:
    """Parse a recipe file, with one-line errors for a missing or malformed one."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise QBenchError(
            f"recipe file {file} not found: give the path of a recipe YAML "
            "(`qbench search` writes them, see README 'Mixed-precision recipes')"
        )
    data = load_yaml(read_text(file), f"recipe file {file}")
    if not isinstance(data, dict):
        raise QBenchError(
            f"recipe file {file} must be a mapping with 'base' and 'overrides', not {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise QBenchError(f"recipe file {file}: {describe_validation(exc)}") from None


def write_recipe(recipe: Recipe, path: Path) -> Path:
    write_atomic(
        path,
        f"# qbench mixed-precision recipe: run it with -b {recipe.backend or 'BACKEND'}:recipe={path.name}\n"
        + recipe.to_yaml(),
    )
    return path


def keep_most_sensitive(
    backend: str,
    base: str,
    ranked_units: list[tuple[str, list[str]]],
    k: int,
    upgrade: Optional[str],
    source: dict[str, Any],
) -> Recipe:
    """The base variant with the ``k`` most sensitive units (``ranked_units``:
    most harmful first, each a unit name and its layers) kept in full
    precision (``upgrade=None``) or quantized as ``upgrade``."""
    layers = [layer for _, unit_layers in ranked_units[:k] for layer in unit_layers]
    overrides = [Override(match=tuple(layers), keep=upgrade is None, use=upgrade)] if layers else []
    return Recipe(
        backend=backend,
        base=base,
        overrides=overrides,
        source={**source, "kept_units": [name for name, _ in ranked_units[:k]], "k": k},
    )
