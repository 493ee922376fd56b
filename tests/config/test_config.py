from pathlib import Path

import pytest

from fedmed.config import RunConfig, TaskConfig, apply_overrides, dump_toml, load_run_config, read_toml
from fedmed.core.errors import ConfigError

MINIMAL = """
name = "t"
[task]
kind = "segmentation"
spatial_dims = 2
image_size = [32, 32]
[[sites]]
name = "a"
path = "data/a"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_minimal_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_run_config(write(tmp_path, MINIMAL))
    assert config.sites[0].path == tmp_path / "data" / "a"
    assert config.output_dir == tmp_path / "runs"
    assert config.strategy.name == "fedavgm" and config.strategy.server_momentum == 0.5
    assert config.engine.name == "inprocess"


def test_client_dp_defaults_to_fedavg_and_an_explicit_strategy_stays(tmp_path: Path) -> None:
    two_sites = MINIMAL + '[[sites]]\nname = "b"\npath = "data/b"\n'
    config = load_run_config(write(tmp_path, two_sites + "\n[client_dp]\nenabled = true\n"))
    assert config.strategy.name == "fedavg"  # FedAvgM's state would hold the un-noised updates
    secure = load_run_config(write(tmp_path, two_sites + "\n[secagg]\nenabled = true\n"))
    assert secure.strategy.name == "fedavgm"  # it steps from the unmasked mean, which the server sees anyway
    explicit = load_run_config(write(tmp_path, MINIMAL + '\n[strategy]\nname = "fedprox"\nproximal_mu = 0.1\n'))
    assert explicit.strategy.name == "fedprox"


@pytest.mark.parametrize(
    ("extra", "epochs"),
    [
        ("", 20),  # every site fine-tuned, early-stopped, delivered only where it wins
        ("\n[dp_sgd]\nenabled = true\n", 0),  # it would spend budget beyond the plan
        ("\n[evaluation]\nditto_lambda = 0.1\n", 0),  # Ditto's personal model is the site's own already
        ("\n[evaluation]\nfinetune_epochs = 3\n", 3),
        ("\n[evaluation]\nfinetune_epochs = 0\n", 0),
    ],
)
def test_sites_fine_tune_by_default_where_nothing_forbids_it(tmp_path: Path, extra: str, epochs: int) -> None:
    config = load_run_config(write(tmp_path, MINIMAL + extra))
    assert config.evaluation.finetune_epochs == epochs
    assert load_run_config(write(tmp_path, dump_toml(config))).evaluation.finetune_epochs == epochs


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_run_config(write(tmp_path, MINIMAL + "[train]\nepochs = 3\n"))
    message = str(error.value)
    assert "run.toml" in message
    assert "unknown key 'train.epochs'" in message
    assert "did you mean 'train.local_epochs'" in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace("image_size = [32, 32]", "image_size = [32, 32, 32]") + "[train]\nrounds = 0\n"
    with pytest.raises(ConfigError) as error:
        load_run_config(write(tmp_path, text))
    message = str(error.value)
    assert "image_size has 3 entries but spatial_dims is 2" in message
    assert "'train.rounds'" in message and "greater than or equal to 1" in message


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.toml: not valid TOML .*line 2"):
        read_toml(write(tmp_path, "name = 't'\n[task\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        read_toml(tmp_path / "nope.toml")


def test_fedprox_without_mu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs proximal_mu > 0"):
        load_run_config(write(tmp_path, MINIMAL + "[strategy]\nname = 'fedprox'\n"))


def test_a_simulation_needs_data(tmp_path: Path) -> None:
    from fedmed.workflows.simulate import simulate

    config = load_run_config(write(tmp_path, MINIMAL.split("[[sites]]")[0]))  # valid for a deployed run
    with pytest.raises(ConfigError, match="a simulation needs data"):
        simulate(config)


def test_quorum_cannot_exceed_sites(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_sites is 3 but the federation has only 1"):
        load_run_config(write(tmp_path, MINIMAL + "[strategy]\nmin_sites = 3\n"))


def test_overrides_parse_toml_values() -> None:
    raw = apply_overrides({"train": {"rounds": 5}}, ["train.rounds=2", "strategy.name=fedprox", "train.amp=false"])
    assert raw == {"train": {"rounds": 2, "amp": False}, "strategy": {"name": "fedprox"}}
    with pytest.raises(ConfigError, match=r"section.key=value"):
        apply_overrides({}, ["rounds"])


def test_enhancement_defaults_to_unit_range_intensities() -> None:
    assert TaskConfig(kind="enhancement", image_size=[32, 32]).intensity == "percentile"
    with pytest.raises(ValueError, match="needs intensities in \\[0, 1\\]"):
        TaskConfig(kind="enhancement", image_size=[32, 32], intensity="zscore")


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = load_run_config(write(tmp_path, MINIMAL))
    again = write(tmp_path, dump_toml(config))
    assert load_run_config(again) == config


def test_normalization_settings_are_checked() -> None:
    from fedmed.config import NormalizationConfig

    with pytest.raises(ValueError, match="percentiles"):
        NormalizationConfig(percentiles=(99.0, 1.0))
    with pytest.raises(ValueError, match="at least 3 increasing percentiles"):
        NormalizationConfig(landmarks=[10.0, 5.0, 50.0])
    assert TaskConfig(kind="enhancement", image_size=[32, 32], intensity="ct_window").intensity == "ct_window"
    with pytest.raises(ValueError, match="needs intensities in \\[0, 1\\]"):
        TaskConfig(kind="enhancement", image_size=[32, 32], intensity="nyul")  # Nyúl extrapolates beyond [0, 1]


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["synthetic", "ixi"])
def test_every_drift_experiment_arm_is_a_valid_run_config(name: str) -> None:
    from fedmed.config import run_config_from_dict

    base = read_toml(REPO / "experiments" / "drift" / f"{name}.toml")
    base.pop("scanners", None)  # the IXI scanners feed fedmed.data.split_into_sites, not the run config
    base.pop("quick", None)  # the benchmark's smoke-test changes, applied like an arm's
    if "synth" not in base:
        base["sites"] = [{"name": "a", "path": "a"}]
    for arm, changes in read_toml(REPO / "experiments" / "drift" / "arms.toml").items():
        raw = {**base, **{section: {**base.get(section, {}), **values} for section, values in changes.items()}}
        assert run_config_from_dict(raw, base=REPO).name, arm


@pytest.mark.parametrize("name", ["synthetic", "ixi"])
def test_every_personalization_benchmark_arm_is_a_valid_run_config(name: str) -> None:
    from fedmed.config import run_config_from_dict

    base = read_toml(REPO / "experiments" / "drift" / f"{name}.toml")
    for key in ("scanners", "quick"):
        base.pop(key, None)
    if "synth" not in base:
        base["sites"] = [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]
    for arm, changes in read_toml(REPO / "experiments" / "personalization" / "arms.toml").items():
        raw = {**base, **{section: {**base.get(section, {}), **values} for section, values in changes.items()}}
        assert run_config_from_dict(raw, base=REPO).name, arm


def synth(**changes: object) -> dict[str, object]:
    settings: dict[str, object] = {"task": "segmentation", "spatial_dims": 3, "image_size": [24, 24, 24]}
    settings["sites"] = [{"name": "a"}, {"name": "b"}]
    settings.update(changes)
    return settings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"spacing": [1.0, 1.0]}, r"synth.spacing \[1.0, 1.0\] must be 3 positive voxel sizes"),
        ({"spacing": [1.0, 0.0, 1.0]}, "must be 3 positive voxel sizes"),
        (
            {"sites": [{"name": "a", "spacing": [0.8, 3.0]}]},
            "synth.sites a: spacing .* has 2 entries but spatial_dims is 3",
        ),
        ({"sites": [{"name": "a", "spacing": [1.0, -1.0, 1.0]}]}, "site a: spacing .* must list positive voxel sizes"),
        (
            {"sites": [{"name": "a", "spacing": [1.0, 1.0, 8.0]}]},
            r"leaves only \[24, 24, 3\] voxels .* raise synth.image_size",
        ),
        ({"task": "classification", "num_classes": 3}, "only segmentation uses; classification .* set it to 2"),
        ({"task": "enhancement", "num_classes": 4}, "only segmentation uses"),
        ({"num_classes": 5}, "less than or equal to 4"),
        ({"modalities": ["FLAIR", "flair"]}, "lists FLAIR, flair more than once"),
        ({"modalities": ["FLAIR", " "]}, "has an empty name"),
        ({"modalities": []}, "at least 1 item"),
    ],
)
def test_synth_refuses_settings_that_make_no_sense(changes: dict[str, object], message: str) -> None:
    from fedmed.config import SynthConfig, validate

    with pytest.raises(ConfigError, match=message):
        validate(SynthConfig, synth(**changes), source="synth.toml")


def test_synth_spacing_gives_each_site_the_same_field_of_view() -> None:
    from fedmed.config import SynthConfig

    config = SynthConfig.model_validate(
        synth(spacing=[1.0, 1.0, 1.25], sites=[{"name": "a"}, {"name": "b", "spacing": [0.8, 0.8, 3.0]}])
    )
    assert config.physical and config.field_of_view_mm == [24.0, 24.0, 30.0]
    assert [config.site_shape(site) for site in config.sites] == [[24, 24, 24], [30, 30, 10]]
    assert not SynthConfig.model_validate(synth()).physical


RUN_WITH_SYNTH = """
name = "t"
[task]
kind = "segmentation"
spatial_dims = 3
image_size = [16, 16, 16]
{task}
[synth]
task = "segmentation"
spatial_dims = 3
image_size = [16, 16, 16]
{synth}
[[synth.sites]]
name = "a"
"""


def test_run_config_and_its_synth_must_agree_on_channels_and_classes(tmp_path: Path) -> None:
    def load(task: str, synth: str) -> RunConfig:
        return load_run_config(write(tmp_path, RUN_WITH_SYNTH.format(task=task, synth=synth)))

    with pytest.raises(
        ConfigError, match=r"task.in_channels is 1 but synth.modalities .* gives 2 .*task.in_channels = 2"
    ):
        load("in_channels = 1", "modalities = ['FLAIR', 'T1']")
    with pytest.raises(ConfigError, match=r"task.in_channels is 2 but synth.modalities"):
        load("in_channels = 2", "")
    with pytest.raises(
        ConfigError, match=r"task.num_classes is 2 but synth.num_classes = 4 .* set task.num_classes = 4"
    ):
        load("", "num_classes = 4")
    with pytest.raises(ConfigError, match=r"binarize_labels .* set task.num_classes = 2"):
        load("num_classes = 4\nbinarize_labels = true", "num_classes = 4")
    # Left unset, in_channels is taken from the data; binarized labels make a 2-class task of nested ones.
    assert load("", "modalities = ['FLAIR', 'T1']").task.in_channels is None
    assert load("binarize_labels = true", "num_classes = 4").task.num_classes == 2
    agreed = load("in_channels = 2\nnum_classes = 4", "modalities = ['FLAIR', 'T1']\nnum_classes = 4")
    assert agreed.synth is not None and agreed.synth.num_classes == agreed.task.num_classes == 4


PRETRAIN_SYNTH = """
[synth]
task = "segmentation"
seed = 4
[[synth.sites]]
name = "a"
"""


def test_pretrain_and_model_init_together_are_refused(tmp_path: Path) -> None:
    text = MINIMAL + '[model]\ninit = "weights.pt"\n[pretrain]\nenabled = true\n'
    with pytest.raises(ConfigError, match=r"pretrain\.enabled = true and model\.init both set the run's starting"):
        load_run_config(write(tmp_path, text))
    assert load_run_config(write(tmp_path, text.replace("enabled = true", "enabled = false"))).model.init is not None


def test_pretrain_settings_are_checked(tmp_path: Path) -> None:
    base = MINIMAL.split("[[sites]]")[0] + PRETRAIN_SYNTH
    with pytest.raises(ConfigError) as error:
        load_run_config(write(tmp_path, base + "[pretrain]\nenabled = true\ncases = 0\nepochs = -1\nseed = -2\n"))
    message = str(error.value)
    assert "'pretrain.cases'" in message and "'pretrain.epochs'" in message and "'pretrain.seed'" in message
    with pytest.raises(ConfigError, match=r"pretrain\.seed 4 is synth\.seed: the phantoms would repeat"):
        load_run_config(write(tmp_path, base + "[pretrain]\nenabled = true\nseed = 4\n"))
    three_classes = '[task]\nkind = "classification"\nnum_classes = 3\n[pretrain]\nenabled = true\n'
    with pytest.raises(ConfigError, match=r"pretrain\.enabled: the phantoms are binary .*init_exclude"):
        load_run_config(write(tmp_path, three_classes))
    assert load_run_config(write(tmp_path, base + "[pretrain]\nenabled = true\n")).pretrain_seed == 5


def test_eval_every_defaults_to_every_round_on_a_grid_and_about_five_evaluations_in_scan_geometry(
    tmp_path: Path,
) -> None:
    from fedmed.config import TrainConfig

    grid = TrainConfig(rounds=40)
    assert grid.eval_every is None and grid.evaluation_interval(scan_geometry=False) == 1
    assert all(grid.evaluates(number, scan_geometry=False) for number in range(1, 41))
    scans = [number for number in range(1, 41) if grid.evaluates(number, scan_geometry=True)]
    assert scans == [8, 16, 24, 32, 40]
    odd = TrainConfig(rounds=7)  # every 2 rounds, and the last
    assert [n for n in range(1, 8) if odd.evaluates(n, scan_geometry=True)] == [2, 4, 6, 7]
    assert [n for n in range(1, 4) if TrainConfig(rounds=3).evaluates(n, scan_geometry=True)] == [1, 2, 3]
    # An explicit value wins in both geometries; the last round is always evaluated.
    explicit = TrainConfig(rounds=5, eval_every=2)
    for scan_geometry in (False, True):
        assert [n for n in range(1, 6) if explicit.evaluates(n, scan_geometry=scan_geometry)] == [2, 4, 5]
    # Unset stays unset through the run directory's config.toml.
    config = load_run_config(write(tmp_path, MINIMAL))
    again = RunConfig.model_validate(read_toml(_dumped(tmp_path, config)))
    assert again.train.eval_every is None


def _dumped(tmp_path: Path, config: RunConfig) -> Path:
    path = tmp_path / "dumped.toml"
    path.write_text(dump_toml(config))
    return path


def test_robust_rules_that_read_each_update_are_refused_under_secagg(tmp_path: Path) -> None:
    two_sites = MINIMAL + '[[sites]]\nname = "b"\npath = "data/b"\n'
    secure = two_sites + "[secagg]\nenabled = true\n"
    with pytest.raises(ConfigError) as error:
        load_run_config(write(tmp_path, secure + '[robust]\nrule = "median"\n'))
    message = str(error.value)
    assert "robust.rule 'median'" in message and "masked sum" in message
    assert "robust.rule = 'norm_bound' with robust.update_norm_bound" in message, "the alternative is named"
    bounded = load_run_config(write(tmp_path, secure + "[robust]\nupdate_norm_bound = 0.5\n"))
    assert bounded.robust.update_norm_bound == 0.5 and bounded.robust.rule == "norm_bound"
    with pytest.raises(ConfigError) as error:
        load_run_config(write(tmp_path, two_sites + "[robust]\nupdate_norm_bound = 0.5\n"))
    message = str(error.value)
    assert "robust.update_norm_bound applies under secagg only" in message
    assert "robust.norm_bound_multiple" in message, "the plaintext alternative is named"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("bits = 12", "compression.bits"),
        ("top_k = 0", "compression.top_k"),
        ("top_k = 1.5", "compression.top_k"),
        ("chunk = 4", "compression.chunk"),
    ],
)
def test_compression_settings_are_checked(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config(write(tmp_path, MINIMAL + f"[compression]\n{section}\n"))


@pytest.mark.parametrize(
    ("compression", "message"),
    [("bits = 8", "compression.bits = 8 cannot be combined with secagg"), ("bits = 16\ntop_k = 0.1", "top_k < 1")],
)
def test_compression_that_secure_aggregation_cannot_carry_is_refused(
    tmp_path: Path, compression: str, message: str
) -> None:
    text = MINIMAL + f"[[sites]]\nname = 'b'\npath = 'data/b'\n[secagg]\nenabled = true\n[compression]\n{compression}\n"
    with pytest.raises(ConfigError, match=message):
        load_run_config(write(tmp_path, text))
    load_run_config(write(tmp_path, text.replace(compression, "bits = 16")))  # 16-bit masked vectors
