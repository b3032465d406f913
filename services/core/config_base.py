"""The base of every section of a run's configuration (`ConfigSection`: unknown keys refused, values checked
on assignment, field docstrings kept as the documentation) and `wire_default`, the rollout request's own
default for a field the config sets too. The sections: `config_inputs` (what is trained on: model, data,
reward), `config_training` (how: algorithm, sampling, LoRA, the trainer), `config_deployment` (where the
services run and how each is set up); `services.core.config` assembles them into `RunConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    model_validator,
)

from services.core.schemas.rollout import (
    RolloutSettings,
)


def wire_default(name: str) -> Any:
    """The rollout request's own default for a field the config sets too (`RolloutSettings`): each default is
    written once, on the wire, and a config left at its defaults sends exactly those."""
    return RolloutSettings.model_fields[name].default


class ConfigSection(BaseModel):
    """Base of every section: unknown keys refused, values checked on assignment too, field docstrings kept
    (they are the documentation)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _comma_separated_lists(cls, data: Any) -> Any:
        """A list setting given as one string (`--set k=a,b`, `RPO_S__K=a,b`, or one plain value) is split
        at its commas, so the command line and the environment take the same forms."""
        if not isinstance(data, Mapping):
            return data
        split = {
            name: [part.strip() for part in data[name].split(",") if part.strip()]
            for name, field in cls.model_fields.items()
            if isinstance(data.get(name), str) and get_origin(field.annotation) is list
        }
        return {**data, **split} if split else data
