"""Which site a ClientApp is serving, from the node's config."""

from __future__ import annotations

import re
from pathlib import Path

from flwr.app import Context

from fedmed.config import RunConfig, load_site_config
from fedmed.config.sites import SITE_NAME_PATTERN
from fedmed.core.errors import FedmedError
from fedmed.flower.records import Layout, decode_config
from fedmed.flower.wire import PARTITION_ID, RUN_CONFIG_KEY, RUN_DIR_KEY, RUN_ID_KEY, SITE_CONFIG
from fedmed.site.privacy import SitePrivacyTerms, ledger_path, simulated_policy
from fedmed.site.session import SiteSession, SiteSpec

_sessions: dict[tuple[str, str, str], SiteSession] = {}
_layouts: dict[int, Layout] = {}
_held_layouts: dict[int, Layout] = {}


def site_session(context: Context) -> SiteSession:
    """The site's session, reused while the process lives (the in-process and Ray engines)."""
    config = decode_config(context.run_config)
    spec = site_spec(context, config)
    key = (spec.name, str(context.run_config[RUN_CONFIG_KEY]), str(spec.state_dir))
    if key not in _sessions:
        _sessions[key] = SiteSession(spec, config)
    return _sessions[key]


def session_layout(session: SiteSession) -> Layout:
    """How the session's shared parameters are packed (sessions live as long as the process)."""
    if id(session) not in _layouts:
        template = session.shared_template()
        _layouts[id(session)] = Layout.of(template, template)
    return _layouts[id(session)]


def session_held_layout(session: SiteSession) -> Layout:
    """How the coordinator packs the values of the session's site-local and frozen keys (fedmed.flower.server.start)."""
    if id(session) not in _held_layouts:
        template = session.held_template()
        _held_layouts[id(session)] = Layout.of(template, template)
    return _held_layouts[id(session)]


def site_state_root(context: Context) -> Path | None:
    """The site's own state folder (its ledger and audit log), without building its session; None when
    the node names no site."""
    node = context.node_config
    if SITE_CONFIG in node:
        return load_site_config(Path(str(node[SITE_CONFIG]))).state_dir
    if PARTITION_ID in node and RUN_DIR_KEY in context.run_config:
        sites = decode_config(context.run_config).sites
        index = int(node[PARTITION_ID])
        if 0 <= index < len(sites):
            return Path(str(context.run_config[RUN_DIR_KEY])) / "sites" / sites[index].name
    return None


def site_spec(context: Context, config: RunConfig) -> SiteSpec:
    node = context.node_config
    if SITE_CONFIG in node:
        site = load_site_config(Path(str(node[SITE_CONFIG])))
        run_id = str(context.run_config[RUN_ID_KEY])
        if not re.match(SITE_NAME_PATTERN, run_id):
            raise FedmedError(f"site {site.name}: refusing run id '{run_id}' (it must be a plain folder name)")
        terms = SitePrivacyTerms(ledger_path=ledger_path(site.state_dir), policy=site.privacy)
        return SiteSpec(
            name=site.name,
            data_path=site.data,
            state_dir=site.state_dir / "runs" / run_id,
            threads=site.daemon.torch_threads,
            run_id=run_id,
            privacy=terms,
            cache_dir=site.state_dir / "preprocessed",  # shared by the site's runs, keyed by the preprocessing
        )
    if PARTITION_ID in node:
        index = int(node[PARTITION_ID])
        if not 0 <= index < len(config.sites):
            raise FedmedError(
                f"simulated node has partition-id {index} but the run lists {len(config.sites)} site(s); "
                f"start the simulation with one node per site"
            )
        site = config.sites[index]
        run_dir = Path(str(context.run_config[RUN_DIR_KEY]))
        state_dir = run_dir / "sites" / site.name
        terms = SitePrivacyTerms(ledger_path=ledger_path(state_dir), policy=simulated_policy(config))
        return SiteSpec(name=site.name, data_path=site.path, state_dir=state_dir, run_id=run_dir.name, privacy=terms)
    raise FedmedError(
        f"node config {dict(node)} names no site; a simulated node needs '{PARTITION_ID}', "
        f"a deployed site daemon is started with 'fedmed site start SITE_CONFIG'"
    )
