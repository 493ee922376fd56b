"""A site's rounds: train from the global weights (DP-SGD charged to its ledger before the update leaves),
evaluate, personalize at the end of the run, and score other sites' personalized models on its data."""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from torch import nn

from fedmed.config import dump_toml
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.data.case_layout import case_ids
from fedmed.models import trained_values
from fedmed.runs.summary import DELIVERED_PERSONALIZED
from fedmed.site.local_layers import DELIVERED_FILE, OPTIMIZER_FILE, PERSONALIZED_FILE, START_FILE, LocalParameterStore
from fedmed.site.model_state import ModelMismatchError
from fedmed.site.parts import SiteParts
from fedmed.site.personal import personal_candidate, train_ditto
from fedmed.site.privacy import DpPlanPreview, SitePrivacy
from fedmed.site.spec import NUM_EXAMPLES, StateDict, site_seed
from fedmed.site.step_watch import watch_validation
from fedmed.tasks import ProximalPull, check_private_model, train_local

# Per-case metrics of the latest evaluation (scan geometry); case ids and paths never leave the site.
EVALUATION_DIR = "evaluation"
GLOBAL_CASES_FILE = "global-cases.csv"
PERSONALIZED_CASES_FILE = "personalized-cases.csv"
RUN_CONFIG_FILE = "config.toml"  # beside the personalized model


def named_by_case_id(rows: list[dict], records: Sequence[dict]) -> list[dict]:
    """The rows (one per record, in order) named by each case's stable id (its file stem where unique, else its
    subject folder: BraTS names every subject's files alike) with its image files beside it."""
    files = [
        [Path(path) for path in ([record["image"]] if isinstance(record["image"], str) else record["image"])]
        for record in records
    ]
    ids = case_ids(files)
    return [
        {"case": case_id, "images": ";".join(map(str, images)), **{k: v for k, v in row.items() if k != "case"}}
        for case_id, images, row in zip(ids, files, rows, strict=True)
    ]


def write_case_metrics(path: Path, rows: list[dict]) -> None:
    """One CSV row per validation case, replacing the previous evaluation's file whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buffer.getvalue())


class SiteTrainer:
    """What a site does with its parts in each exchange of a run."""

    def __init__(self, site: SiteParts) -> None:
        self.site = site

    @cached_property
    def privacy(self) -> SitePrivacy | None:
        spec = self.site.spec
        if spec.privacy is None:
            return None
        return SitePrivacy(
            site=spec.name,
            run_id=spec.run_id,
            dataset=self.site.cases.data.name,
            terms=spec.privacy,
            config=self.site.config,
        )

    @property
    def private(self) -> bool:
        return self.privacy is not None and self.privacy.enabled

    def dp_plan(self) -> DpPlanPreview:
        """[dp_sgd]: the run's plan before its first round (σ, sampling rate, steps), fixed in the ledger as the
        first round would fix it, nothing charged. Refuses as training would: a model DP-SGD cannot train (before
        the ledger is touched), an exhausted budget, a σ past the site's ceiling."""
        site = self.site
        if not self.private:
            raise FedmedError(f"site {site.spec.name}: the coordinator asks for a DP-SGD plan but [dp_sgd] is off")
        check_private_model(site.models.network, model_name=site.config.model.name)
        preview = self.privacy.preview(num_examples=len(site.cases.training_cases))
        config = site.config
        trained = trained_values(site.models.network, trainable=config.trainable, rank=config.dp_sgd.adapter_rank)
        return dataclasses.replace(preview, trained_values=trained)

    def train(self, global_state: StateDict, *, server_round: int, proximal_mu: float) -> tuple[StateDict, dict]:
        """Train from the global weights; with DP-SGD the ledger is charged before the update is returned. What the
        site keeps (its local layers, its optimizer's state, Ditto's personal model) stays in its state folder."""
        site, config = self.site, self.site.config
        model, local = self._start_round(global_state)
        metrics: dict[str, float] = {}
        if config.evaluation.ditto_lambda > 0:  # before training: it starts from the model as received
            metrics |= train_ditto(site, model, global_state, server_round=server_round)
        cases = site.cases.training_cases
        dp_step = self.privacy.step_for_round(num_examples=len(cases)) if self.private else None
        epochs = config.train.local_epochs
        kept = site.models.kept_optimizer(OPTIMIZER_FILE)
        with site.watch_steps(f"round {server_round}", epochs=epochs, dp=dp_step) as watch:
            result = train_local(
                model,
                cases,
                task=site.task,
                train=site.round_train_config(server_round),
                epochs=epochs,
                steps=config.train.local_steps,
                seed=site_seed(config.seed, site.spec.name, server_round),
                device=site.device,
                loss_terms=[ProximalPull.toward_start(model, keys=set(global_state), mu=proximal_mu)],
                optimizer_state=site.models.load_optimizer_state(kept),
                dp=dp_step,
                workers=config.data.workers,
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
            site.models.local_store.save({key: trained[key] for key in local})
        update = {key: trained[key].detach().cpu() for key in global_state}
        return update, metrics

    def _start_round(self, global_state: StateDict) -> tuple[nn.Module, list[str]]:
        """The model as received, once the site's policy allows the round; with the local-only baseline, the
        first model received is kept as its start."""
        site = self.site
        if self.privacy is not None:
            self.privacy.check_allowed()
        model, local = site.models.model_with(global_state)
        if self.private:  # refuse an unfit model before anything reaches the ledger
            check_private_model(model, model_name=site.config.model.name)
        if site.config.evaluation.local_baseline:
            start = LocalParameterStore(site.spec.state_dir, file_name=START_FILE)
            if not start.path.exists():  # the local-only baseline starts where the federation did
                start.save(model.state_dict())
        return model, local

    def evaluate(self, global_state: StateDict) -> dict:
        started = time.perf_counter()
        model, _ = self.site.models.model_with(global_state)
        return self.score(model, started=started, cases_file=GLOBAL_CASES_FILE)

    def score(self, model: nn.Module, *, started: float, cases_file: str | None = None) -> dict:
        site = self.site
        validation = site.cases.data.val
        with watch_validation(label=f"site {site.spec.name}", cases=len(validation)):
            metrics, rows = site.task.evaluate_cases(model, validation, device=site.device)
        if rows and cases_file:
            rows = named_by_case_id(rows, validation.records)
            write_case_metrics(site.spec.state_dir / EVALUATION_DIR / cases_file, rows)
        return {NUM_EXAMPLES: len(validation), **metrics, "eval_seconds": time.perf_counter() - started}

    def lends_personalized_model(self, *, final: bool) -> bool:
        """Whether the other sites may evaluate this site's personalized model: its own policy decides, and Ditto's
        personal model never leaves the site."""
        if final and self.site.config.evaluation.ditto_lambda > 0:
            return False
        privacy = self.site.spec.privacy
        return privacy is None or privacy.policy.share_personalized_model

    def personalize(self, global_state: StateDict, *, server_round: int, final: bool) -> tuple[StateDict, dict]:
        """Global weights + this site's local layers; at the end of the run, with fine-tuning or Ditto, the site's own
        model instead, and the delivered model: the better of the two on the site's tuning split. Both are kept in the
        site's state folder. Returns the personal parameters and the personalized model's metrics on this site's
        validation data (with the tuning scores and the choice)."""
        site = self.site
        state_dir = site.spec.state_dir
        model, _ = site.models.model_with(global_state)
        choice: dict[str, float] = {}
        if final and site.config.evaluation.personal_training:
            global_model = model
            model, choice = personal_candidate(site, global_model, server_round=server_round)
            delivered = model if choice[DELIVERED_PERSONALIZED] else global_model
            LocalParameterStore(state_dir, file_name=DELIVERED_FILE).save(delivered.state_dict())
        state = model.state_dict()
        LocalParameterStore(state_dir, file_name=PERSONALIZED_FILE).save(state)
        # With the run's config beside it, the site applies its own model (fedmed predict) without the coordinator.
        write_text_atomic(state_dir / RUN_CONFIG_FILE, dump_toml(site.config))
        personal = {key: state[key].detach().cpu().clone() for key in site.models.personal_keys(final=final)}
        metrics = self.score(model, started=time.perf_counter(), cases_file=PERSONALIZED_CASES_FILE)
        return personal, {**metrics, **choice}

    def evaluate_models(self, global_state: StateDict, personal: dict[str, StateDict]) -> dict[str, dict]:
        """The global model (with this site's own local layers, as in every round) and each other site's
        personalized model on this site's validation data."""
        results = {"global": self.evaluate(global_state)}
        for name, parameters in personal.items():
            started = time.perf_counter()
            model, _ = self.site.models.model_with(global_state)
            unknown = set(parameters) - set(model.state_dict())
            if unknown:
                raise ModelMismatchError(
                    f"site {self.site.spec.name}: model '{name}' has parameters this model lacks: "
                    f"{sorted(unknown)[:3]}; coordinator and sites must run the same model"
                )
            model.load_state_dict(parameters, strict=False)
            results[name] = self.score(model, started=started)
        return results
