"""fedmed's Python API (fedmed.api, re-exported from fedmed): configs in, a simulated run out, read back, applied
to new scans and handed over."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fedmed
import fedmed.api as api
from fedmed.api import ConfigError, FedmedError

TINY: dict[str, Any] = {
    "name": "api",
    "seed": 3,
    "output_dir": "runs",
    "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [32, 32]},
    "model": {"channels": [8, 16]},
    "train": {"rounds": 2, "local_epochs": 1, "batch_size": 4, "learning_rate": 0.003},
    "synth": {
        "task": "segmentation",
        "spatial_dims": 2,
        "image_size": [32, 32],
        "train_cases": 4,
        "val_cases": 2,
        "seed": 1,
        "sites": [{"name": "site-a"}, {"name": "site-b", "intensity_scale": 2.0, "gamma": 1.3}],
    },
}


def test_fedmed_names_the_api_without_importing_it() -> None:
    assert set(api.__all__) == fedmed._API, "fedmed/__init__.py's _API must list fedmed.api.__all__"
    assert fedmed.simulate is api.simulate and fedmed.RunConfig is api.RunConfig
    probe = "import sys, fedmed; print('torch' in sys.modules, 'fedmed.api' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["False", "False"], "`import fedmed` must stay cheap: the `fedmed` command imports it"
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        _ = fedmed.simulat


def test_a_config_loads_from_a_mapping_a_file_or_the_demo(tmp_path: Path) -> None:
    changes = ["train.rounds=3", "strategy.name=fedprox", "strategy.proximal_mu=0.01"]
    config = api.load_config(TINY, base=tmp_path, overrides=changes)
    assert (config.train.rounds, config.strategy.name, config.output_dir) == (3, "fedprox", tmp_path / "runs")
    assert TINY["train"]["rounds"] == 2, "the caller's mapping is left as it was"
    file = tmp_path / "run.toml"
    file.write_text(
        'name = "from-file"\noutput_dir = "out"\n[task]\nkind = "classification"\n[train]\nrounds = 5\n',
        encoding="utf-8",
    )
    loaded = api.load_config(file, overrides="train.local_epochs=2")
    assert (loaded.name, loaded.train.rounds, loaded.train.local_epochs) == ("from-file", 5, 2)
    assert loaded.output_dir == tmp_path / "out", "a file's relative paths start at its folder"
    demo = api.demo_config(output_dir=tmp_path / "demo", overrides=["train.rounds=1"])
    assert demo.name == "demo" and demo.train.rounds == 1 and demo.output_dir == tmp_path / "demo"
    assert api.demo_config(private=True, output_dir=tmp_path).dp_sgd.enabled
    assert api.demo_config_file().is_file()


@pytest.mark.parametrize(
    ("changes", "overrides", "named"),
    [
        ({"train": {"rounds": 0}}, [], "train.rounds"),
        ({}, ["train.learning_rate=-1"], "train.learning_rate"),
        ({"train": {"roundz": 3}}, [], "did you mean 'train.rounds'"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], overrides: list[str], named: str
) -> None:
    raw = {**TINY, **{key: {**TINY[key], **value} for key, value in changes.items()}}
    with pytest.raises(ConfigError, match="my run") as error:
        api.load_config(raw, base=tmp_path, overrides=overrides, label="my run")
    assert named in str(error.value)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.toml: config file not found"):
        api.load_config(tmp_path / "absent.toml")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> api.RunResults:
    root = tmp_path_factory.mktemp("api-run")
    return api.simulate(api.load_config(TINY, base=root))


@pytest.mark.federation
def test_simulate_returns_what_the_run_directory_holds(run: api.RunResults) -> None:
    assert run.run_dir.is_dir() and run.final_model == run.run_dir / "checkpoints" / "final.pt"
    assert run.report is not None and run.report.is_file()
    assert run.status["state"] == "completed"
    assert [row["round"] for row in run.rounds] == [1, 2]
    assert {(row["site"], row["phase"]) for row in run.metrics if row["round"] == 2} >= {
        ("site-a", "train"),
        ("site-b", "evaluate"),
    }
    assert [site.name for site in run.config.sites] == ["site-a", "site-b"], "the generated sites are listed"
    assert set(run.scores) == {"site-a", "site-b"} and 0.0 <= run.scores["site-a"]["federated"]["dice"] <= 1.0
    assert "site-a" in run.table and "federated dice" in run.table


@pytest.mark.federation
def test_open_run_reads_back_what_simulate_wrote(run: api.RunResults) -> None:
    opened = fedmed.open_run(run.run_dir)
    assert opened.config.model_dump(mode="json") == run.config.model_dump(mode="json")
    assert (opened.metrics, opened.rounds, opened.status) == (run.metrics, run.rounds, run.status)
    assert (opened.final_model, opened.report, opened.table) == (run.final_model, run.report, run.table)
    with pytest.raises(FedmedError, match=r"no config\.toml"):
        api.open_run(run.run_dir / "checkpoints")


@pytest.mark.federation
def test_predict_applies_the_run_to_new_scans(run: api.RunResults, tmp_path: Path) -> None:
    site = run.config.sites[0].path
    prediction = api.predict(run.run_dir, site, out=tmp_path / "predicted", device="cpu")
    assert prediction.cases and not prediction.failed and "global model" in prediction.model
    assert all(Path(outcome.output).is_file() for outcome in prediction.cases)
    with (tmp_path / "predicted" / "cases.csv").open(encoding="utf-8") as table:
        assert [row["case"] for row in csv.DictReader(table)] == [outcome.case for outcome in prediction.cases]


@pytest.mark.federation
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_export_writes_a_bundle_and_torchscript(run: api.RunResults, tmp_path: Path) -> None:
    bundle = api.export(run.run_dir, out=tmp_path / "bundle")
    assert (bundle / "configs" / "metadata.json").is_file() and (bundle / "models" / "model.pt").is_file()
    scripted = api.export(run.final_model, out=tmp_path / "model.ts", format="torchscript")
    output = torch.jit.load(str(scripted))(torch.zeros(1, 1, 32, 32))
    assert output.shape == (1, 2, 32, 32)
    with pytest.raises(FedmedError, match="'onnx' is not known"):
        api.export(run.run_dir, out=tmp_path / "x", format="onnx")  # type: ignore[arg-type]
