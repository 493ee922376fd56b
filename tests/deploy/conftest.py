from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_helpers import running_federation

from fedmed.config import SiteDrift, SynthConfig
from fedmed.deploy.local import LocalFederation

DRIFTS = [SiteDrift(name="a"), SiteDrift(name="b", intensity_scale=2.0, noise_std=0.03), SiteDrift(name="c", gamma=1.3)]


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """Coordinator and three sites, provisioned with TLS and node keys, serving until the tests end.

    One federation for every deployment test: starting one takes about a minute. A test that stops,
    kills or reconfigures a party restores it before it ends."""
    synth = SynthConfig(
        task="segmentation", spatial_dims=2, image_size=[32, 32], train_cases=4, val_cases=3, seed=1, sites=DRIFTS
    )
    with running_federation(tmp_path_factory.mktemp("federation"), synth) as federation:
        yield federation
