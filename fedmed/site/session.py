"""A site's session in one run, framework-free: global weights in, shared update and metrics out.

It lives as long as its process and serves every round of the run. The Flower ClientApp is a thin
adapter around it; the same code serves the in-process engine, Flower's simulation engine and
deployment.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedmed.config import RunConfig, dump_toml
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.models import KeyPartition
from fedmed.site.local_layers import PERSONALIZED_FILE, LocalParameterStore
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
        self.__dict__.pop("data", None)  # refitted statistics: normalize again
        if self.config.task.intensity != "nyul":  # Nyúl's result needs the federation's landmarks first
            shared["after"] = self.normalization.histogram(self.raw_data, self.data)
        return shared

    def use_standard_landmarks(self, landmarks: list[float]) -> None:
        """Nyúl harmonization: map this site's intensities onto the federation's average landmarks."""
        self.normalization.set_standard_landmarks(landmarks)
        if landmarks != self._landmarks_in_use:
            self._landmarks_in_use = list(landmarks)
            self.__dict__.pop("data", None)

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
        return self.privacy.preview(num_examples=len(self.data.train))

    def _watch_training(
        self, what: str, *, epochs: int, dp: DpSgdStep | None = None
    ) -> contextlib.AbstractContextManager[TrainingWatch]:
        """Slow local epochs shown live or logged (fedmed.site.step_watch); quick ones stay quiet."""
        from fedmed.privacy import steps_per_epoch

        batch = (dp and dp.logical_batch_size) or self.config.train.batch_size
        batches = steps_per_epoch(len(self.data.train), batch)
        if dp is not None and dp.steps is not None:  # DP-SGD's steps for the budget: passes as they fall
            epochs = -(-dp.steps // batches)
        return watch_training(label=f"site {self.spec.name}: {what}", epochs=epochs, batches_per_epoch=batches)

    def train(self, global_state: StateDict, *, server_round: int, proximal_mu: float) -> tuple[StateDict, dict]:
        """Train from the global weights; with DP-SGD the ledger is charged before the update is returned."""
        from fedmed.tasks import check_private_model, train_local

        if self.privacy is not None:
            self.privacy.check_allowed()
        private = self.privacy is not None and self.privacy.enabled
        model, local = self._model_with(global_state)
        if private:  # refuse an unfit model before anything reaches the ledger
            check_private_model(model, model_name=self.config.model.name)
        dp_step = self.privacy.step_for_round(num_examples=len(self.data.train)) if private else None
        epochs = self.config.train.local_epochs
        with self._watch_training(f"round {server_round}", epochs=epochs, dp=dp_step) as watch:
            result = train_local(
                model,
                self.data.train,
                task=self.task,
                train=self.config.train,
                epochs=epochs,
                seed=site_seed(self.config.seed, self.spec.name, server_round),
                device=self.device,
                proximal_mu=proximal_mu,
                proximal_keys=set(global_state),
                dp=dp_step,
                workers=self.config.data.workers,
                on_step=watch.step,
            )
        metrics = {
            NUM_EXAMPLES: result.num_examples,
            "train_loss": result.loss,
            "train_steps": result.steps,
            "train_seconds": result.seconds,
        }
        if dp_step is not None:
            metrics |= self.privacy.charge(server_round=server_round, steps=result.steps)
        trained = model.state_dict()
        if local:
            self.local_store.save({key: trained[key] for key in local})
        update = {key: trained[key].detach().cpu() for key in global_state}
        return update, metrics

    def evaluate(self, global_state: StateDict) -> dict:
        started = time.perf_counter()
        model, _ = self._model_with(global_state)
        return self._evaluate(model, started=started, cases_file=GLOBAL_CASES_FILE)

    def _evaluate(self, model: nn.Module, *, started: float, cases_file: str | None = None) -> dict:
        with watch_validation(label=f"site {self.spec.name}", cases=len(self.data.val)):
            metrics, rows = self.task.evaluate_cases(model, self.data.val, device=self.device)
        if rows and cases_file:
            write_case_metrics(self.spec.state_dir / EVALUATION_DIR / cases_file, rows)
        return {NUM_EXAMPLES: len(self.data.val), **metrics, "eval_seconds": time.perf_counter() - started}

    @property
    def shares_personalized_model(self) -> bool:
        """Whether this site lets the other sites evaluate its personalized model (its own policy decides)."""
        return self.spec.privacy is None or self.spec.privacy.policy.share_personalized_model

    def full_template(self) -> StateDict:
        """Every parameter and buffer of the model, in state-dict order."""
        return self._model_and_keys[0].state_dict()

    def personal_keys(self, *, final: bool) -> list[str]:
        """The parameters in which this site's personalized model differs from the global model: all but the
        frozen ones once fine-tuned (at the end of the run, if asked), else its site-local layers."""
        model, keys, _ = self._model_and_keys
        if final and self.config.evaluation.finetune_epochs:
            return [key for key in model.state_dict() if key not in keys.frozen]
        return list(keys.local)

    def personalize(self, global_state: StateDict, *, server_round: int, final: bool) -> tuple[StateDict, dict]:
        """Global weights + this site's local layers, fine-tuned on its own data at the end of the run if asked;
        kept in the site's state folder. Returns the personal parameters and the model's metrics on this site's
        data."""
        from fedmed.tasks import train_local

        model, _ = self._model_with(global_state)
        epochs = self.config.evaluation.finetune_epochs if final else 0
        tuned = {}
        if epochs:
            with self._watch_training("fine-tuning", epochs=epochs) as watch:
                result = train_local(
                    model,
                    self.data.train,
                    task=self.task,
                    train=self.config.train,
                    epochs=epochs,
                    seed=site_seed(self.config.seed, self.spec.name, -server_round),
                    device=self.device,
                    on_step=watch.step,
                )
            tuned = {"finetune_loss": result.loss, "finetune_seconds": result.seconds}
        state = model.state_dict()
        LocalParameterStore(self.spec.state_dir, file_name=PERSONALIZED_FILE).save(state)
        # With the run's config beside it, the site applies its own model (fedmed predict) without the coordinator.
        write_text_atomic(self.spec.state_dir / RUN_CONFIG_FILE, dump_toml(self.config))
        personal = {key: state[key].detach().cpu().clone() for key in self.personal_keys(final=final)}
        metrics = self._evaluate(model, started=time.perf_counter(), cases_file=PERSONALIZED_CASES_FILE)
        return personal, {**metrics, **tuned}

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
            results[name] = self._evaluate(model, started=started)
        return results
