"""Shared building blocks of the policy schema."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer

from meshlib.config.durations import format_duration, parse_duration

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""Seconds in memory; a string with a unit (``250ms``) in the policy and in dumps."""


class Strict(BaseModel):
    """Unknown keys are errors; models are immutable; defaults are validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
