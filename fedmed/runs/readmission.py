"""The coordinator's re-admission of a quarantined site: a request the run's next start carries out.

Quarantine is decided by the coordinator's server from the sites' updates; only a person lifts it, by
resuming the run with --readmit. The request is written into the run directory; the server applies it when
it restores the quarantine from the checkpoint, records it in the first resumed round's row, then removes it.
"""

from __future__ import annotations

from fedmed.core.errors import FedmedError

from .run_dir import READMIT_FILE, RunDirectory


def quarantined_sites(run_dir: RunDirectory) -> list[str]:
    """The sites quarantined after the run's last recorded round."""
    rounds = run_dir.read_rounds()
    return list(rounds[-1].get("sites_quarantined", [])) if rounds else []


def request_readmission(run_dir: RunDirectory, sites: list[str]) -> None:
    """Ask the resumed run to take these quarantined sites back; refuses a site that is not quarantined."""
    if not sites:
        return
    held = quarantined_sites(run_dir)
    strangers = [site for site in sites if site not in held]
    if strangers:
        raise FedmedError(
            f"--readmit {', '.join(strangers)}: not quarantined in run {run_dir.path.name} "
            f"(quarantined: {', '.join(held) or 'none'}); see 'fedmed status' or the run's report"
        )
    run_dir.write_json(READMIT_FILE, sorted(set(sites)))
