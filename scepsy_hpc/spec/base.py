"""Base class of every spec model: frozen, unknown keys rejected with the list of valid ones."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class SpecModel(BaseModel):
    """Frozen pydantic model whose unknown keys are errors that list the valid keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = {name for name in cls.model_fields}
            valid |= {f.alias for f in cls.model_fields.values() if f.alias}
            for key in data:
                if key not in valid:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key '{key}'; valid keys here: {valid}",
                        {"key": key, "valid": ", ".join(sorted(valid))},
                    )
        return data
