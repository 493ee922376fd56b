"""What travels between the ServerApp and the ClientApp, named once: message types, record keys,
round-config keys, and the run's and nodes' config keys. Both sides import them from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MessageType:
    """A Flower message type: the server sends `str(type)`; the ClientApp registers `action` under
    the category's decorator (`@app.query(INTENSITY_FIT.action)` handles "query.intensity_fit")."""

    category: str  # Flower's: "train", "evaluate" or "query"
    action: str = "default"

    def __str__(self) -> str:
        return self.category if self.action == "default" else f"{self.category}.{self.action}"


# Flower's own "train" and "evaluate" carry the rounds; fedmed adds these.
INTENSITY_FIT = MessageType("query", "intensity_fit")  # fit site normalization, share summaries
INTENSITY_APPLY = MessageType("query", "intensity_apply")  # map onto the federation's Nyúl landmarks
PERSONALIZE = MessageType("query", "personalize")  # build, score (and lend) the personalized model
CROSS_EVALUATE = MessageType("query", "cross_evaluate")  # score the other sites' models here
DP_PLAN = MessageType("query", "dp_plan")  # [dp_sgd]: each site's planned σ, sampling and steps, before round 1
# The model card at the end of the run (fedmed.flower.server.model_card): statistics only, never cases.
MODEL_CARD_REFERENCE = MessageType("query", "model_card_reference")  # NLL per temperature, training feature sums
MODEL_CARD_CALIBRATE = MessageType("query", "model_card_calibrate")  # reliability bins, OOD score histogram
# SecAgg+'s four exchanges; "train" so that Flower treats them as training work.
SECAGG_SETUP = MessageType("train", "secagg_setup")
SECAGG_SHARE_KEYS = MessageType("train", "secagg_share")
SECAGG_MASK = MessageType("train", "secagg_mask")
SECAGG_UNMASK = MessageType("train", "secagg_unmask")

# Records of a message's RecordDict.
ARRAYS = "arrays"  # ArrayRecord: model parameters, packed (fedmed.flower.records.Layout)
HELD = "held"  # ArrayRecord: frozen parameters and site-local starting values the coordinator holds, packed
CONFIG = "config"  # ConfigRecord: the round's settings
METRICS = "metrics"  # MetricRecord: a site's metrics
SITE = "site"  # ConfigRecord {SITE_NAME: name}: who replied
SUMMARY = "intensity"  # ConfigRecord: a site's intensity summaries
PERSONAL = "personal"  # ArrayRecord: a site's personal parameters, packed in its personal layout
LOCAL_BASELINE = "local-baseline"  # MetricRecord: a site's local-only model on its data, as far as its policy shares
PLAN = "dp-plan"  # MetricRecord: a site's DP-SGD plan (fedmed.site.privacy.DpPlanPreview), numbers only
SECAGG = "secagg"  # ConfigRecord: one SecAgg+ protocol message
CARD_STATISTICS = "model-card"  # MetricRecord: a site's model-card statistics (fedmed.site.model_card), numbers only
COMPRESSED = "compressed"  # ArrayRecord: a site's update (local - global) encoded by [compression] (fedmed.compression)
MASKED = "masked"  # ArrayRecord {VECTOR: the masked uint32 vector}
VECTOR = "vector"

SITE_NAME = "name"

# Keys of the CONFIG record.
SERVER_ROUND = "server-round"  # Flower's strategies set it
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx sets it
LAYOUT_DIGEST = "layout-digest"  # the packed parameters' layout, checked by the site
STANDARD_LANDMARKS = "intensity-landmarks"  # the federation's Nyúl landmarks
CLIPPING_MODE = "client-dp-clipping"  # "fixed" or "adaptive": which Flower clipping mod the site applies
FINAL = "final"  # the end-of-run evaluation, where a site fine-tunes if the run asks
MODELS = "models"  # names of the personalized models a message carries, in order
CARD_FOLD_TEMPERATURES = "card-fold-temperatures"  # per calibration fold, the temperature fitted on the other fold
CARD_OOD_MEAN = "card-ood-mean"  # the pooled training features' per-dimension mean
CARD_OOD_VAR = "card-ood-var"  # ... and variance
CARD_OOD_GROUPS = "card-ood-groups"  # ... and the lengths of the feature vector's parts, each scored on its own


def personal_record(index: int) -> str:
    """The ArrayRecord holding the index-th personalized model of a cross-evaluation message."""
    return f"{PERSONAL}-{index}"


def model_metrics_record(model: str) -> str:
    """The MetricRecord of one model's scores in a cross-evaluation reply."""
    return f"{METRICS}-{model}"


# The run's UserConfig: the resolved run config travels as one JSON string.
RUN_CONFIG_KEY = "fedmed-config"
RUN_DIR_KEY = "fedmed-run-dir"
RUN_ID_KEY = "fedmed-run-id"
SUBMISSION_KEY = "fedmed-submission"  # deployment: the one-use token that stands for the run directory
SITE_NODES_KEY = "fedmed-site-nodes"  # deployment: {node id: site name}, so messages can name silent sites

# A node's config: which site a ClientApp serves.
PARTITION_ID = "partition-id"  # set by Flower's simulation engine and by fedmed's in-process engine
NUM_PARTITIONS = "num-partitions"
SITE_CONFIG = "site-config"  # set by `fedmed site start` on a deployed site's SuperNode

# Set by fedmed's executor for the coordinator's ServerApp: the server.toml whose state holds submissions.
SERVER_CONFIG_ENV = "FEDMED_SERVER_CONFIG"
