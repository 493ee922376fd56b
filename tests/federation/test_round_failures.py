"""Bad site data: refused before training in simulation; in the round loop, quorum decides."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import pytest

from fedmed.data import DataValidationError
from fedmed.flower.client.app import app as client_app
from fedmed.flower.engines.inprocess import run_inprocess
from fedmed.flower.records import encode_run
from fedmed.flower.server.app import app as server_app
from fedmed.flower.server.rounds import RoundFailedError
from fedmed.runs import RunDirectory
from fedmed.workflows.simulate import materialize_sites, simulate


def _break_a_site(config) -> str:
    """Delete one training image of site-b; returns its path."""
    site = next(s for s in config.sites if s.name == "site-b")
    victim = sorted((site.path / "imagesTr").iterdir())[0]
    victim.unlink()
    return str(victim)


def test_simulation_refuses_bad_data_before_training(tiny_config) -> None:
    config = materialize_sites(tiny_config())
    victim = _break_a_site(config)
    with pytest.raises(DataValidationError) as error:
        simulate(config)
    assert victim in str(error.value) and "Fix:" in str(error.value)
    assert not list(config.output_dir.glob("*/metrics.jsonl")), "nothing was trained"
    assert [path.name for path in config.output_dir.iterdir()] == ["data"], "no stub run folder"


def _run_loop(config) -> RunDirectory:
    run_dir = RunDirectory.create(config.output_dir, config.name)
    run_inprocess(
        server_app=server_app,
        client_app=client_app,
        num_sites=len(config.sites),
        run_config=encode_run(config, run_dir=run_dir.path, run_id=run_dir.path.name),
        run_id=zlib.crc32(run_dir.path.name.encode()),
    )
    return run_dir


def test_a_failing_site_is_dropped_while_the_quorum_holds(tiny_config, caplog) -> None:
    config = materialize_sites(tiny_config(strategy={"min_sites": 2}))
    victim = _break_a_site(config)
    caplog.set_level(logging.WARNING, logger="fedmed")
    run_dir = _run_loop(config)
    trained = {row["site"] for row in run_dir.read_metrics() if row["phase"] == "train"}
    assert trained == {"site-a", "site-c"}
    dropped = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("round") and " dropped " in r.getMessage()
    ]
    assert len(dropped) == 2 and Path(victim).name in dropped[0]
    assert (run_dir.checkpoints / "final.pt").exists()
    for row in run_dir.read_rounds():  # the round log says who refused, and why
        assert row["sites_trained"] == ["site-a", "site-c"] and row["sites_dropped"] == []
        (reason,) = row["sites_refused"].values()  # keyed "node <id>": in simulation a site is named by its replies
        # The file by name, not the site's path (the site's own log keeps that: fedmed.flower.client.neutral).
        assert Path(victim).name in reason and victim not in reason


def test_a_round_below_quorum_fails_loudly(tiny_config) -> None:
    config = materialize_sites(tiny_config())
    victim = _break_a_site(config)
    with pytest.raises(RoundFailedError) as error:
        _run_loop(config)
    message = str(error.value)
    assert "round 1: 2 of 3 site(s) returned an update, quorum is 3" in message
    assert "site 'site-b' at site-b: 1 problem(s) found" in message and "lower strategy.min_sites" in message
    assert victim not in message, "the coordinator is told the problem, not the site's paths"


def test_a_run_resumes_from_its_last_checkpoint(tiny_config) -> None:
    config = materialize_sites(tiny_config())
    run_dir = _run_loop(config)
    longer = config.model_copy(deep=True)
    longer.train.rounds = 3
    run_inprocess(
        server_app=server_app,
        client_app=client_app,
        num_sites=3,
        run_config=encode_run(longer, run_dir=run_dir.path, run_id=run_dir.path.name),
        run_id=7,
    )
    rounds = [row["round"] for row in run_dir.read_metrics() if row["phase"] == "train"]
    assert rounds == [1, 1, 1, 2, 2, 2, 3, 3, 3]
