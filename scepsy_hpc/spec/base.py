"""Base class of every spec model: frozen, unknown keys rejected with the list of valid ones."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError


class SpecModel(BaseModel):
    """Frozen pydantic model whose unknown keys are errors that list the valid keys."""

    # NaN and infinity are refused in every spec field: `.inf` tokens or seconds would hang the sampler
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any, info: ValidationInfo) -> Any:
        """Unknown keys are errors listing the valid keys.

        Validated through `spec.source.validate`, they are recorded in the context's
        `unknown_keys` list and dropped, so validation goes on and every other problem is reported
        in the same run; without that context the first unknown key raises.
        """
        if not isinstance(data, dict):
            return data
        valid = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = [key for key in data if key not in valid]
        if not unknown:
            return data
        sink = (info.context or {}).get("unknown_keys") if info is not None else None
        if sink is None:
            raise PydanticCustomError(
                "unknown_key",
                "unknown key '{key}'; valid keys here: {valid}",
                {"key": unknown[0], "valid": ", ".join(sorted(valid))},
            )
        for key in unknown:
            sink.append((id(data), key, ", ".join(sorted(valid))))
        return {k: v for k, v in data.items() if k in valid}
