"""A multiple-choice item, as qbench's JSONL and lm-eval task files give it:
checked strictly, because a malformed item scores silently wrong."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from qbench.core.errors import QBenchError, describe_validation


def _digits_to_int(value: Any) -> Any:
    # lm-eval templates render targets as text: "2" means index 2.
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class ChoiceItem(BaseModel):
    """One multiple-choice item. Strict on purpose: a fractional gold index
    would be truncated, an empty choice has log-likelihood 0 and always
    wins, and integer choices or contexts used to fail deep in tokenizing."""

    model_config = ConfigDict(extra="ignore")
    context: StrictStr
    choices: list[StrictStr] = Field(min_length=2)
    gold: Annotated[StrictInt, BeforeValidator(_digits_to_int)]
    #: lm-eval's acc_norm denominators (choice length without the delimiter)
    norm_lengths: Optional[list[int]] = None

    @model_validator(mode="after")
    def _check(self):
        if any(not c.strip() for c in self.choices):
            raise ValueError("a choice is empty: it would score log-likelihood 0 and always win")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} is not among the {len(self.choices)} choices")
        return self


def validate_item(raw: Any, where: str) -> dict[str, Any]:
    """A task item checked against ``ChoiceItem``, or a one-line error naming
    ``where`` (file and line) and the field."""
    if not isinstance(raw, dict):
        raise QBenchError(
            f'{where}: expected a JSON object {{"context": str, "choices": [str, ...], '
            f'"gold": int}}, got {type(raw).__name__}'
        )
    try:
        return ChoiceItem.model_validate(raw).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise QBenchError(
            f'{where}: {describe_validation(exc)} (expected {{"context": str, "choices": [str, ...], "gold": int}})'
        ) from None
