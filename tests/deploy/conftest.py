from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_helpers import close_leaving_nothing, require_nginx

from fedmed.config import SiteDrift, SynthConfig
from fedmed.data import synthesize_federation
from fedmed.deploy.local import LocalFederation

DRIFTS = [SiteDrift(name="a"), SiteDrift(name="b", intensity_scale=2.0, noise_std=0.03), SiteDrift(name="c", gamma=1.3)]


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """Coordinator and three sites, provisioned with TLS and node keys, serving until the tests end.

    One federation for every deployment test: starting one takes about a minute. A test that stops,
    kills or reconfigures a party restores it before it ends."""
    require_nginx()
    root = tmp_path_factory.mktemp("federation")
    synth = SynthConfig(
        task="segmentation", spatial_dims=2, image_size=[32, 32], train_cases=4, val_cases=3, seed=1, sites=DRIFTS
    )
    sites = synthesize_federation(synth, root / "data")
    federation = LocalFederation(root, site_data={site.name: site.path for site in sites})
    federation.provision()
    try:
        federation.start()
        yield federation
    finally:
        close_leaving_nothing(federation)
