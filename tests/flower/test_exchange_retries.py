"""A SuperLink that answers 500 while replies are collected (its SQLite state locked under load) costs a poll, not the
run; any other refusal still ends it."""

from __future__ import annotations

import httpx
import pytest

from fedmed.flower.server import exchange


class FlakyGrid:
    def __init__(self, status: int) -> None:
        self.status, self.calls = status, 0

    def pull_messages(self, message_ids):
        self.calls += 1
        if self.calls == 1:
            request = httpx.Request("POST", "https://127.0.0.1/v1/runtime/pull-messages")
            response = httpx.Response(self.status, request=request)
            raise httpx.HTTPStatusError("locked", request=request, response=response)
        return ["reply"]


def test_a_server_error_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange.time, "sleep", lambda seconds: None)
    grid = FlakyGrid(500)
    assert exchange._retrying(lambda: grid.pull_messages({"id"})) == []
    assert exchange._retrying(lambda: grid.pull_messages({"id"})) == ["reply"]


def test_a_refusal_is_not() -> None:
    with pytest.raises(httpx.HTTPStatusError):
        exchange._retrying(lambda: FlakyGrid(403).pull_messages({"id"}))
