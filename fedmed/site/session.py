"""A site's session in one run, framework-free: global weights in, shared update and metrics out.

It lives as long as its process and serves every round of the run. The Flower ClientApp is a thin
adapter around it; the same code serves the in-process engine, Flower's simulation engine and
deployment.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmed.config import RunConfig, TrainConfig, dump_toml
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.models import KeyPartition
from fedmed.runs.summary import DELIVERED_PERSONALIZED
from fedmed.site.local_layers import (
    DELIVERED_FILE,
    OPTIMIZER_FILE,
    PERSONALIZED_FILE,
    START_FILE,
    LocalParameterStore,
    OptimizerStateStore,
)
from fedmed.site.normalization import SiteNormalization
from fedmed.site.privacy import DpPlanPreview, SitePrivacy, SitePrivacyTerms
from fedmed.site.step_watch import TrainingWatch, watch_training, watch_validation

if TYPE_CHECKING:
    from fedmed.data import SiteData  # imported when first used: loading pulls in MONAI
    from fedmed.data.scan_site import ScanSite
    from fedmed.tasks import DpSgdStep

StateDict = dict[str, torch.Tensor]

NUM_EXAMPLES = "num-examples"  # the metric that weighs a site's update or score (Flower's key)
# Per-case metrics of the latest evaluation (scan geometry); case names never leave the site.
EVALUATION_DIR = "evaluation"
GLOBAL_CASES_FILE = "global-cases.csv"
PERSONALIZED_CASES_FILE = "personalized-cases.csv"
RUN_CONFIG_FILE = "config.toml"  # beside the personalized model


class DataChannelsError(FedmedError):
    """The site's cases have another number of modalities than the run's network takes."""


class ModelMismatchError(FedmedError):
    """Stored site-local parameters do not fit the model this site builds from the run config."""


@dataclass(frozen=True)
class SiteSpec:
    name: str
    data_path: Path
    state_dir: Path  # this site's private folder for this run (site-local parameters)
    threads: int | None = None  # torch CPU threads, when the site caps them
    run_id: str = ""
    privacy: SitePrivacyTerms | None = None  # None: no DP policy binds this site (e.g. a baseline)
    cache_dir: Path | None = None  # preprocessed cases kept across runs (scan geometry, data.cache = "disk")

    @property
    def preprocessed_dir(self) -> Path:
        return self.cache_dir or self.state_dir / "preprocessed"


def site_seed(base_seed: int, site_name: str, server_round: int) -> int:
    """A per-site, per-round seed that is the same in every engine and process."""
    return (base_seed * 1_000_003 + zlib.crc32(site_name.encode()) + server_round * 7_919) % (2**31 - 1)


def round_learning_rate(train: TrainConfig, *, server_round: int, rounds: int) -> float:
    """train.lr_schedule at this round: constant, or a cosine from the learning rate down to a tenth of it."""
    if train.lr_schedule == "constant" or rounds <= 1:
        return train.learning_rate
    progress = (server_round - 1) / (rounds - 1)
    return train.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))))


def write_case_metrics(path: Path, rows: list[dict]) -> None:
    """One CSV row per validation case, replacing the previous evaluation's file whole."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buffer.getvalue())


class SiteSession:
    """A site's data, task and model partition for one run; cheap to reuse across rounds."""

    def __init__(self, spec: SiteSpec, config: RunConfig) -> None:
        from fedmed.tasks import get_task, select_device

        self.spec = spec
        self.config = config
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.task = get_task(config.task)
        self.device = select_device(config.train.device)
        self.local_store = LocalParameterStore(spec.state_dir)
        self._landmarks_in_use: list[float] | None = None
        self._held: StateDict | None = None

    @cached_property
    def normalization(self) -> SiteNormalization:
        return SiteNormalization(site=self.spec.name, state_dir=self.spec.state_dir, config=self.config)

    @cached_property
    def raw_data(self) -> SiteData:
        """The site's data resampled, its intensities as the scanner wrote them (site-level modes) or
        normalized per image."""
        from fedmed.data import load_site

        task = self.config.task
        if not self.normalization.site_level:
            task = task.model_copy(update={"intensity": "none"})
        return load_site(self.spec.data_path, task=task)

    @cached_property
    def data(self) -> SiteData | ScanSite:
        """The site's data as the model sees it (normalized per image or with the site's statistics); in scan
        geometry, datasets that preprocess cases when first read and cache them within data.max_cached_cases."""
        from fedmed.data import load_site

        if self.config.task.scan_geometry:
            from fedmed.data.scan_site import open_scan_site

            data = open_scan_site(self.spec.data_path, config=self.config, cache_dir=self.spec.preprocessed_dir)
        elif self.normalization.site_level:
            data = self.normalization.apply(self.raw_data)
        else:
            data = load_site(self.spec.data_path, task=self.config.task)
        self._check_channels(data)
        return data

    @cached_property
    def _split(self) -> tuple[Sequence, Sequence | None]:
        """With fine-tuning or Ditto: the training cases the site's own model trains on, and its tuning split, the
        rest (scan geometry splits on opening). The federated training uses every training case: holding a fifth
        of a small site's cases out of it cost the global model more than the choice gained (README)."""
        data = self.data
        if not self.config.evaluation.personal_training:
            return data.train, None
        if getattr(data, "tune", None) is not None:  # scan geometry: split into datasets when the site was opened
            return data.personal_train, data.tune
        from fedmed.data.tuning import tuning_split

        kept, held = tuning_split(
            len(data.train), fraction=self.config.evaluation.tuning_fraction, seed=self.config.seed, site=self.spec.name
        )
        return [data.train[i] for i in kept], [data.train[i] for i in held]

    @property
    def training_cases(self) -> Sequence:
        """What the site trains on for the federation (and its local-only baseline): every training case."""
        return self.data.train

    @property
    def personal_training_cases(self) -> Sequence:
        """What the site's own model (fine-tune, Ditto) trains on: its training cases but the tuning split."""
        return self._split[0]

    @property
    def tuning_cases(self) -> Sequence | None:
        return self._split[1]

    def _check_channels(self, data: SiteData | ScanSite) -> None:
        """The run's network takes task.channels inputs; a site with other modalities must not train on it."""
        found = getattr(data, "channels", None)
        if found is None and data.train:
            found = int(data.train[0]["image"].shape[0])
        if found is not None and found != self.config.task.channels:
            raise DataChannelsError(
                f"site {self.spec.name}: its images have {found} channel(s) (modalities) but the run's network takes "
                f"{self.config.task.channels}; the coordinator sets task.in_channels = {found} in the run config, or "
                f"this site lists the run's modalities in {self.spec.data_path}"
            )

    def describe_intensities(self) -> dict:
        """Fit the site's normalization; what it shares: image count, histograms, Nyúl landmarks."""
        shared = self.normalization.fit(self.raw_data)
        self._forget_data()  # refitted statistics: normalize again
        if self.config.task.intensity != "nyul":  # Nyúl's result needs the federation's landmarks first
            shared["after"] = self.normalization.histogram(self.raw_data, self.data)
        return shared

    def use_standard_landmarks(self, landmarks: list[float]) -> None:
        """Nyúl harmonization: map this site's intensities onto the federation's average landmarks."""
        self.normalization.set_standard_landmarks(landmarks)
        if landmarks != self._landmarks_in_use:
            self._landmarks_in_use = list(landmarks)
            self._forget_data()

    def _forget_data(self) -> None:
        for name in ("data", "_split"):
            self.__dict__.pop(name, None)

    def harmonized_histogram(self) -> dict:
        return self.normalization.histogram(self.raw_data, self.data)

    def build_model(self) -> tuple[nn.Module, KeyPartition]:
        """A fresh model (model.freeze applied) and its keys: shared, site-local, frozen. model.init is not read
        here: it is a path on the coordinator's disk, whose values arrive with the round (use_held)."""
        from fedmed.models import partition_keys, starting_model

        start = starting_model(self.config.task, self.config.model, load_init=False)
        return start.network, partition_keys(start.network, fedbn=self.config.strategy.fedbn, frozen=start.frozen)

    @cached_property
    def _model_and_keys(self) -> tuple[nn.Module, KeyPartition, StateDict]:
        """The session's model (reused: every round overwrites all its parameters and buffers), its
        keys, and the site-local parameters' initial values."""
        model, keys = self.build_model()
        state = model.state_dict()
        initial_local = {key: state[key].detach().clone() for key in keys.local}
        return model.to(self.device), keys, initial_local

    def shared_template(self) -> StateDict:
        """The shared parameters in state-dict order (initial values): what travels each round."""
        model, keys, _ = self._model_and_keys
        state = model.state_dict()
        return {key: state[key] for key in keys.shared}

    def held_template(self) -> StateDict:
        """The site-local and frozen entries (initial values), in the order the coordinator sends their values."""
        model, keys, _ = self._model_and_keys
        state = model.state_dict()
        return {key: state[key] for key in keys.held}

    def use_held(self, held: StateDict) -> None:
        """The coordinator's values for the keys the shared weights leave out, sent with every round when the run
        sets model.init, model.freeze or [pretrain]: frozen parameters, and the site-local layers' starting values."""
        self._held = held

    def _model_with(self, global_state: StateDict) -> tuple[nn.Module, list[str]]:
        """The model with the global shared parameters, the coordinator's frozen ones and this site's local ones.

        The caller has checked that `global_state` fits the model (fedmed.flower.records.Layout);
        load_state_dict still refuses anything missing or misshapen.
        """
        model, keys, initial_local = self._model_and_keys
        local = keys.local
        state = dict(global_state)
        if self.config.sends_held_values and keys.held:
            if self._held is None:
                raise ModelMismatchError(
                    f"site {self.spec.name}: the run sets model.init, model.freeze or [pretrain] but the coordinator "
                    "sent no values for the frozen and site-local parameters; coordinator and site must run the same "
                    "fedmed version"
                )
            state.update({key: self._held[key] for key in keys.frozen})
            initial_local = {key: self._held[key] for key in local}
        if local:
            stored = self.local_store.load()
            if stored is not None and set(stored) != set(local):
                raise ModelMismatchError(
                    f"site {self.spec.name}: {self.local_store.path} holds site-local parameters of a different "
                    f"model; move it aside to restart this site's normalization layers from scratch"
                )
            # Before a site's first round its local layers start from the model's initial values.
            state.update(stored if stored is not None else initial_local)
        model.load_state_dict(state)
        return model, local

    @cached_property
    def privacy(self) -> SitePrivacy | None:
        if self.spec.privacy is None:
            return None
        return SitePrivacy(
            site=self.spec.name,
            run_id=self.spec.run_id,
            dataset=self.data.name,
            terms=self.spec.privacy,
            config=self.config,
        )

    def dp_plan(self) -> DpPlanPreview:
        """[dp_sgd]: the run's plan before its first round (σ, sampling rate, steps), fixed in the ledger as the
        first round would fix it, nothing charged. Refuses as training would: a model DP-SGD cannot train (before
        the ledger is touched), an exhausted budget, a σ past the site's ceiling."""
        from fedmed.tasks import check_private_model

        if self.privacy is None or not self.privacy.enabled:
            raise FedmedError(f"site {self.spec.name}: the coordinator asks for a DP-SGD plan but [dp_sgd] is off")
        check_private_model(self._model_and_keys[0], model_name=self.config.model.name)
        return self.privacy.preview(num_examples=len(self.training_cases))

    def watch_steps(
        self, what: str, *, epochs: int, dp: DpSgdStep | None = None
    ) -> contextlib.AbstractContextManager[TrainingWatch]:
        """Slow local epochs shown live or logged (fedmed.site.step_watch); quick ones stay quiet."""
        from fedmed.privacy import steps_per_epoch

        batch = (dp and dp.logical_batch_size) or self.config.train.batch_size
        batches = steps_per_epoch(len(self.training_cases), batch)
        steps = dp.steps if dp is not None else self.config.train.local_steps
        if steps is not None:  # a step budget (DP-SGD's or train.local_steps): passes as they fall
            epochs = -(-steps // batches)
        return watch_training(label=f"site {self.spec.name}: {what}", epochs=epochs, batches_per_epoch=batches)

    def round_train_config(self, server_round: int) -> TrainConfig:
        train = self.config.train
        learning_rate = round_learning_rate(train, server_round=server_round, rounds=train.rounds)
        return train.model_copy(update={"learning_rate": learning_rate})

    def kept_optimizer(self, file_name: str) -> OptimizerStateStore | None:
        """Where the optimizer's state waits for the next round (train.keep_optimizer_state), else None."""
        if not self.config.train.keep_optimizer_state:
            return None
        return OptimizerStateStore(self.spec.state_dir, file_name=file_name)

    def load_optimizer_state(self, store: OptimizerStateStore | None) -> dict | None:
        state = store.load() if store is not None else None
        if state is not None and len(state.get("param_groups", [{}])[0].get("params", [])) != sum(
            1 for p in self._model_and_keys[0].parameters() if p.requires_grad
        ):
            raise ModelMismatchError(
                f"site {self.spec.name}: {store.path} holds the optimizer state of a different model; move it aside "
                "to restart this site's optimizer from scratch"
            )
        return state

    def train(self, global_state: StateDict, *, server_round: int, proximal_mu: float) -> tuple[StateDict, dict]:
        """Train from the global weights; with DP-SGD the ledger is charged before the update is returned. What the
        site keeps (its local layers, its optimizer's state, Ditto's personal model) stays in its state folder."""
        from fedmed.tasks import check_private_model, train_local

        if self.privacy is not None:
            self.privacy.check_allowed()
        private = self.privacy is not None and self.privacy.enabled
        model, local = self._model_with(global_state)
        if private:  # refuse an unfit model before anything reaches the ledger
            check_private_model(model, model_name=self.config.model.name)
        if self.config.evaluation.local_baseline:
            start = LocalParameterStore(self.spec.state_dir, file_name=START_FILE)
            if not start.path.exists():  # the local-only baseline starts where the federation did
                start.save(model.state_dict())
        metrics: dict[str, float] = {}
        if self.config.evaluation.ditto_lambda > 0:  # before training: it starts from the model as received
            from fedmed.site import personal as personal_models

            metrics |= personal_models.train_ditto(self, model, global_state, server_round=server_round)
        dp_step = self.privacy.step_for_round(num_examples=len(self.training_cases)) if private else None
        epochs = self.config.train.local_epochs
        kept = self.kept_optimizer(OPTIMIZER_FILE)
        with self.watch_steps(f"round {server_round}", epochs=epochs, dp=dp_step) as watch:
            result = train_local(
                model,
                self.training_cases,
                task=self.task,
                train=self.round_train_config(server_round),
                epochs=epochs,
                steps=self.config.train.local_steps,
                seed=site_seed(self.config.seed, self.spec.name, server_round),
                device=self.device,
                proximal_mu=proximal_mu,
                proximal_keys=set(global_state),
                optimizer_state=self.load_optimizer_state(kept),
                dp=dp_step,
                workers=self.config.data.workers,
                on_step=watch.step,
            )
        metrics = {
            NUM_EXAMPLES: result.num_examples,
            "train_loss": result.loss,
            "train_steps": result.steps,
            "train_seconds": result.seconds,
            **metrics,
        }
        if dp_step is not None:
            metrics |= self.privacy.charge(server_round=server_round, steps=result.steps)
        if kept is not None:
            kept.save(result.optimizer_state)
        trained = model.state_dict()
        if local:
            self.local_store.save({key: trained[key] for key in local})
        update = {key: trained[key].detach().cpu() for key in global_state}
        return update, metrics

    @cached_property
    def personal_network(self) -> nn.Module:
        """A second network for the site's own model (Ditto, fine-tuning), so the global one stays as received."""
        return self.build_model()[0].to(self.device)

    def evaluate(self, global_state: StateDict) -> dict:
        started = time.perf_counter()
        model, _ = self._model_with(global_state)
        return self.score(model, started=started, cases_file=GLOBAL_CASES_FILE)

    def score(self, model: nn.Module, *, started: float, cases_file: str | None = None) -> dict:
        with watch_validation(label=f"site {self.spec.name}", cases=len(self.data.val)):
            metrics, rows = self.task.evaluate_cases(model, self.data.val, device=self.device)
        if rows and cases_file:
            write_case_metrics(self.spec.state_dir / EVALUATION_DIR / cases_file, rows)
        return {NUM_EXAMPLES: len(self.data.val), **metrics, "eval_seconds": time.perf_counter() - started}

    def lends_personalized_model(self, *, final: bool) -> bool:
        """Whether the other sites may evaluate this site's personalized model: its own policy decides, and Ditto's
        personal model never leaves the site."""
        if final and self.config.evaluation.ditto_lambda > 0:
            return False
        return self.spec.privacy is None or self.spec.privacy.policy.share_personalized_model

    def full_template(self) -> StateDict:
        """Every parameter and buffer of the model, in state-dict order."""
        return self._model_and_keys[0].state_dict()

    def personal_keys(self, *, final: bool) -> list[str]:
        """The parameters in which this site's personalized model differs from the global model: all but the
        frozen ones once trained at the site (fine-tune or Ditto, at the end of the run), else its site-local
        layers."""
        model, keys, _ = self._model_and_keys
        if final and self.config.evaluation.personal_training:
            return [key for key in model.state_dict() if key not in keys.frozen]
        return list(keys.local)

    def personalize(self, global_state: StateDict, *, server_round: int, final: bool) -> tuple[StateDict, dict]:
        """Global weights + this site's local layers; at the end of the run, with fine-tuning or Ditto, the site's own
        model instead, and the delivered model: the better of the two on the site's tuning split. Both are kept in the
        site's state folder. Returns the personal parameters and the personalized model's metrics on this site's
        validation data (with the tuning scores and the choice)."""
        model, _ = self._model_with(global_state)
        choice: dict[str, float] = {}
        if final and self.config.evaluation.personal_training:
            global_model = model
            from fedmed.site import personal as personal_models

            model, choice = personal_models.personal_candidate(self, global_model, server_round=server_round)
            delivered = model if choice[DELIVERED_PERSONALIZED] else global_model
            LocalParameterStore(self.spec.state_dir, file_name=DELIVERED_FILE).save(delivered.state_dict())
        state = model.state_dict()
        LocalParameterStore(self.spec.state_dir, file_name=PERSONALIZED_FILE).save(state)
        # With the run's config beside it, the site applies its own model (fedmed predict) without the coordinator.
        write_text_atomic(self.spec.state_dir / RUN_CONFIG_FILE, dump_toml(self.config))
        personal = {key: state[key].detach().cpu().clone() for key in self.personal_keys(final=final)}
        metrics = self.score(model, started=time.perf_counter(), cases_file=PERSONALIZED_CASES_FILE)
        return personal, {**metrics, **choice}

    def evaluate_models(self, global_state: StateDict, personal: dict[str, StateDict]) -> dict[str, dict]:
        """The global model (with this site's own local layers, as in every round) and each other site's
        personalized model on this site's validation data."""
        results = {"global": self.evaluate(global_state)}
        for name, parameters in personal.items():
            started = time.perf_counter()
            model, _ = self._model_with(global_state)
            unknown = set(parameters) - set(model.state_dict())
            if unknown:
                raise ModelMismatchError(
                    f"site {self.spec.name}: model '{name}' has parameters this model lacks: "
                    f"{sorted(unknown)[:3]}; coordinator and sites must run the same model"
                )
            model.load_state_dict(parameters, strict=False)
            results[name] = self.score(model, started=started)
        return results
