"""The base of every recipe section: unknown keys, inf / NaN and booleans in number fields are errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    # inf / NaN in a recipe (lr: .inf, weight: .nan) would train into NaN without a word
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads `true` as a boolean, which pydantic would take as 1 in a number field (run.steps: true)
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in (int, float, int | None, float | None):
            raise ValueError(f"Input should be a number, not the boolean {str(value).lower()}")
        return value
