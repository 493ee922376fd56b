"""What a site's refusal tells the coordinator: the reason and the fix, without the site's paths or its
ledger's id (the site's own log keeps those)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedmed.flower.client.neutral import site_neutral
from fedmed.privacy import LEDGER_FILENAME
from fedmed.privacy.ledger_anchor import LedgerAnchorError
from fedmed.site.ledger_guard import open_site_ledger


def _ledger_error(state: Path, *, replace: bool) -> tuple[LedgerAnchorError, str]:
    ledger = state / LEDGER_FILENAME
    with open_site_ledger(ledger) as opened:
        ledger_id = opened.ledger_id
    if replace:  # another site's ledger copied in: the anchor remembers a different id
        other = state.parent / "other" / LEDGER_FILENAME
        open_site_ledger(other).close()
        shutil.copyfile(other, ledger)
    else:
        ledger.unlink()
    with pytest.raises(LedgerAnchorError) as refused:
        open_site_ledger(ledger)
    return refused.value, ledger_id


@pytest.mark.parametrize("replace", [False, True], ids=["missing", "replaced"])
def test_a_ledger_refusal_reaches_the_coordinator_without_paths_or_ids(tmp_path: Path, replace: bool) -> None:
    state = tmp_path / "hospital-a" / "state"
    error, ledger_id = _ledger_error(state, replace=replace)
    full = str(error)
    assert str(state) in full and ledger_id in full, "the site's own log keeps the detail"

    told = site_neutral(full)
    assert str(tmp_path) not in told and "hospital-a/" not in told and "/state" not in told
    assert ledger_id not in told
    assert "privacy-ledger.sqlite" in told and "fedmed site ledger-reset" in told, "the reason and the fix stay"
    assert ("is missing" if not replace else "was replaced") in told


def test_what_the_coordinator_knows_stays() -> None:
    digest = "ab" * 32
    text = f"app {digest} is not approved; run 'fedmed site approve site.toml {digest}' (see https://x.org/a/b), ε/δ"
    assert site_neutral(text) == text
    assert site_neutral("data folder /srv/pacs/export/ does not exist.") == "data folder export does not exist."
