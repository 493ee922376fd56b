"""ε from history and σ calibration agree with Opacus' own accountants and search."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedmed.core.opacus import import_opacus
from fedmed.privacy import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    compress_history,
    epsilon_spent,
)

DELTA = 1e-5
# Two runs' worth of per-round entries, as the ledger stores them (not consecutive-merged).
HISTORY = [(1.1, 0.01, 100), (1.1, 0.01, 100), (1.3, 0.02, 50), (1.1, 0.01, 100)]
# Computed once with Opacus 1.6.0 (RDPAccountant / PRVAccountant, default parameters) on HISTORY.
GOLDEN_RDP = 1.252228846273094
GOLDEN_PRV = 1.0165148736503877


def _opacus_epsilon(history: list[tuple[float, float, int]], accountant: str) -> float:
    engine = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    engine.history = list(history)
    return float(engine.get_epsilon(delta=DELTA))


def test_rdp_epsilon_equals_opacus_and_golden() -> None:
    ours = epsilon_spent(HISTORY, delta=DELTA, accountant="rdp")
    assert ours == pytest.approx(_opacus_epsilon(HISTORY, "rdp"), abs=1e-9)
    assert ours == pytest.approx(GOLDEN_RDP, abs=1e-6)


def test_prv_epsilon_equals_opacus_and_golden() -> None:
    ours = epsilon_spent(HISTORY, delta=DELTA, accountant="prv")
    assert ours == pytest.approx(_opacus_epsilon(HISTORY, "prv"), rel=1e-3)
    assert ours == pytest.approx(GOLDEN_PRV, rel=1e-3)


def test_empty_history_spends_nothing() -> None:
    assert epsilon_spent([], delta=DELTA, accountant="rdp") == 0.0
    assert epsilon_spent([], delta=DELTA, accountant="prv") == 0.0


def test_compression_groups_equal_mechanisms_and_keeps_epsilon() -> None:
    assert compress_history(HISTORY) == [(1.1, 0.01, 300), (1.3, 0.02, 50)]
    long_history = [(1.2, 0.01, 10)] * 300  # 300 rounds: uncompressed PRV would take minutes
    assert epsilon_spent(long_history, delta=DELTA, accountant="prv") == pytest.approx(
        _opacus_epsilon([(1.2, 0.01, 3000)], "prv"), rel=1e-6
    )


def test_unknown_accountant_and_bad_delta_are_config_errors() -> None:
    with pytest.raises(PrivacyConfigError, match="unknown privacy accountant 'gdp'"):
        epsilon_spent(HISTORY, delta=DELTA, accountant="gdp")
    with pytest.raises(PrivacyConfigError, match="δ must be in"):
        epsilon_spent(HISTORY, delta=0.0, accountant="rdp")


# σ from opacus.accountants.utils.get_noise_multiplier(target_epsilon=3, target_delta=1e-5,
# sample_rate=0.02, steps=200, accountant=...) with Opacus 1.6.0.
GOLDEN_SIGMA = {"rdp": 0.887451171875, "prv": 0.8270263671875}


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # from Opacus' own search
def test_calibration_matches_opacus_with_empty_history_rdp() -> None:
    ours = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.02, planned_steps=200, prior_history=[], accountant="rdp"
    )
    theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.02, steps=200, accountant="rdp")
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours == pytest.approx(GOLDEN_SIGMA["rdp"], rel=1e-9)


def test_calibration_matches_opacus_with_empty_history_prv() -> None:
    # Opacus' own PRV search takes seconds, so its result is pinned above rather than rerun.
    ours = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.02, planned_steps=200, prior_history=[], accountant="prv"
    )
    assert ours == pytest.approx(GOLDEN_SIGMA["prv"], rel=1e-6)
    assert 3.0 - 0.01 <= epsilon_spent([(ours, 0.02, 200)], delta=DELTA, accountant="prv") <= 3.0


def test_calibration_with_prior_history_needs_more_noise_and_lands_on_target() -> None:
    prior = [(1.1, 0.01, 100)]
    fresh = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.02, planned_steps=200, prior_history=[], accountant="rdp"
    )
    sigma = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.02, planned_steps=200, prior_history=prior, accountant="rdp"
    )
    assert sigma > fresh
    total = epsilon_spent([*prior, (sigma, 0.02, 200)], delta=DELTA, accountant="rdp")
    assert 3.0 - 0.01 <= total <= 3.0


def test_calibration_refuses_when_prior_history_spent_the_target() -> None:
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"privacy budget exhausted \(ε 1.25 spent of 1.00\)"):
        calibrate_noise_multiplier(
            target_epsilon=1.0,
            delta=DELTA,
            sample_rate=0.02,
            planned_steps=10,
            prior_history=HISTORY,
            accountant="rdp",
        )


def test_calibration_refuses_absurd_noise() -> None:
    with pytest.raises(PrivacyConfigError, match=r"budget too small for the planned steps.*fewer rounds"):
        calibrate_noise_multiplier(
            target_epsilon=0.01,
            delta=DELTA,
            sample_rate=1.0,
            planned_steps=100_000,
            prior_history=[],
            accountant="rdp",
        )
    # Almost all spent already: the remainder cannot pay for the plan even with huge noise.
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"nearly exhausted.*fewer rounds"):
        calibrate_noise_multiplier(
            target_epsilon=GOLDEN_RDP + 1e-6,
            delta=DELTA,
            sample_rate=1.0,
            planned_steps=1000,
            prior_history=HISTORY,
            accountant="rdp",
        )


def test_opacus_root_handler_is_removed_even_when_imported_elsewhere_first() -> None:
    root = logging.getLogger()
    opacus_like = logging.StreamHandler(sys.stderr)
    opacus_like.setFormatter(logging.Formatter("%(asctime)s:%(levelname)s:%(message)s"))
    root.addHandler(opacus_like)
    try:
        import_opacus()
        assert opacus_like not in root.handlers
    finally:
        root.removeHandler(opacus_like)


def test_package_import_is_light_and_first_opacus_import_leaves_root_clean(tmp_path: Path) -> None:
    # A stand-in "opacus" that, like the real one, calls basicConfig on import (with another
    # format, so only the before/after snapshot can catch it); the real package costs seconds.
    fake = tmp_path / "opacus"
    fake.mkdir()
    (fake / "__init__.py").write_text("import logging\nlogging.basicConfig(format='%(message)s')\n")
    script = textwrap.dedent(
        """
        import logging, sys
        import fedmed.privacy
        from fedmed.core.opacus import import_opacus
        assert "opacus" not in sys.modules and "torch" not in sys.modules, "fedmed.privacy imported opacus"
        before = list(logging.getLogger().handlers)
        import_opacus()
        assert "opacus" in sys.modules
        assert logging.getLogger().handlers == before, logging.getLogger().handlers
        """
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 0, result.stderr
