"""The base of every config section."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys fail loudly instead of being ignored; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
