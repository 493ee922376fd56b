"""The errors of the SecAgg+ core: each message names the stage, the reason and the fix."""

from __future__ import annotations

from collections.abc import Mapping

from fedmed.core.errors import FedmedError


class SecAggError(FedmedError):
    """Base class of every secure-aggregation error."""


class SecAggRoundError(SecAggError):
    """The round cannot produce a correct aggregate (too many sites lost, corrupt shares, overflow).

    `stage` names the protocol stage that failed and `lost` maps every site lost so far to the
    stage at which it was lost, so the transport can report them by name.
    """

    def __init__(self, message: str, *, stage: str, lost: Mapping[int, str] | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.lost: dict[int, str] = dict(lost or {})


class SecAggProtocolError(SecAggError):
    """A message breaks the protocol (wrong stage, malformed field, unsafe request); the receiver refuses it."""


class SecAggInputError(SecAggError, ValueError):
    """Local input cannot be aggregated (weight out of range, NaN, wrong size) or a setting is invalid."""
