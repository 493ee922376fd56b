"""Sampling the sites of a round while one connects: nobody connected is left out at fraction_train = 1."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedmed.flower.server.exchange import NodesAsOfNow


class SiteConnectsWhileSampling:
    """A grid on which a third site connects right after the first look at the node list."""

    def __init__(self) -> None:
        self.looks = 0

    def get_node_ids(self) -> list[int]:
        self.looks += 1
        return [1, 2] if self.looks == 1 else [1, 2, 3]


def _sampled(grid: object) -> list[int]:
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=1)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    return sorted(message.metadata.dst_node_id for message in strategy.configure_train(1, arrays, ConfigRecord(), grid))


def test_flower_alone_leaves_a_connected_site_out(server_task: None) -> None:
    assert len(_sampled(SiteConnectsWhileSampling())) == 2, "the race NodesAsOfNow exists for"


def test_the_round_samples_every_site_connected_when_it_looked(server_task: None) -> None:
    assert _sampled(NodesAsOfNow(SiteConnectsWhileSampling())) == [1, 2]
