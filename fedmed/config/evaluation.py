"""[evaluation] and [baselines]: what the run compares the federated model with, and where."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig


# A run config that leaves evaluation.finetune_epochs unset fine-tunes this many epochs at most (RunConfig's default):
# a cap against a runaway; the early stop ends the fine-tune (BraTS' CBICA stopped itself after 8, cut at 5 it fell
# short of its local-only model: docs/benchmarks/every-site.md).
DEFAULT_FINETUNE_EPOCHS = 20


class EvaluationConfig(StrictModel):
    """Cross-site evaluation: the global and every site's personalized model on every site's validation data."""

    cross_site: bool = Field(True, description="evaluate the models across sites at the end of the run")
    cross_site_every: int = Field(0, ge=0, description="also every N rounds (0: only at the end)")
    finetune_epochs: int = Field(
        0,
        ge=0,
        description="personalization: at most this many epochs of local fine-tuning of global + local layers at the "
        "end, stopped early on the site's tuning split (or its folds); unset in a run config: 20, or 0 under DP-SGD "
        "or with Ditto",
    )
    ditto_lambda: float = Field(
        0.0,
        ge=0,
        description="personalization (Ditto): each site also trains a personal model every round, pulled towards the "
        "global one with this weight (lambda/2 ||v - w||^2); it never leaves the site. 0: off",
    )
    tuning_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="fine-tuning or Ditto: share of each site's training cases held out of training to stop the "
        "fine-tune and choose the delivered model (global or personalized); never the validation cases",
    )
    cross_validate_below: int = Field(
        5,
        ge=0,
        description="fine-tuning: a site whose tuning split would hold fewer cases than this chooses the fine-tune's "
        "length and its delivered model by k-fold cross-validation over all its training cases instead (leave-one-out "
        "up to 5 cases, else 5 folds), then fine-tunes on all of them; 0: always the tuning split. Ditto keeps the "
        "tuning split (its personal model trains through the run)",
    )
    local_baseline: bool = Field(
        False,
        description="every site also trains a local-only model on its own compute, from the first global model it "
        "received, with the run's local steps (if its policy allows), so it sees federated, personalized and "
        "local-only side by side on its own data; it reports only the metrics its policy shares",
    )
    model_card: bool = Field(
        True,
        description="at the end of the run the sites fit temperature scaling and the out-of-distribution reference of "
        "the final global model from sums and counts of their own cases (model_card.json); skipped, with the reason "
        "noted, when the run trains with differential privacy",
    )

    @property
    def personal_training(self) -> bool:
        """Whether sites train a model of their own (fine-tune or Ditto) and so hold out a tuning split."""
        return self.finetune_epochs > 0 or self.ditto_lambda > 0

    @property
    def may_cross_validate(self) -> bool:
        """Whether a small site chooses by cross-validation (fedmed.data.tuning.cross_validates decides per site)."""
        return self.finetune_epochs > 0 and self.ditto_lambda == 0 and self.cross_validate_below > 0


class BaselinesConfig(StrictModel):
    local_only: bool = False
    pooled: bool = False


def check_baselines(run: RunConfig) -> None:
    """One local-only comparison per run: at the sites (evaluation.local_baseline) or in the simulation."""
    if run.evaluation.local_baseline and run.baselines.local_only:
        raise ValueError(
            "evaluation.local_baseline and baselines.local_only both train local-only models; keep one: "
            "evaluation.local_baseline at each site on its own compute (deployment), baselines.local_only in the "
            "simulation's process"
        )
