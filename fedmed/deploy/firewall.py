"""`fedmed server firewall`: the SuperLink's loopback port, closed to every local account but the coordinator's.

Flower 1.41's SuperLink serves its Control API (register nodes, start and stop runs) and its runtime
API on the internal port without account authentication. The front proxy keeps the network out; a
local user of the coordinator host is not out. Linux can filter by the account that owns a socket
(nftables `meta skuid`, in the output hook, where the connection starts): this table lets only the
coordinator's service account (and the accounts named) open connections to 127.0.0.1:internal_port.
Everyone else's connection is reset before the SuperLink sees it. It needs root to install (nft).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess

from fedmed.config import ServerConfig
from fedmed.core.errors import FedmedError

# nginx's workers take this account when the proxy is started by root (nginx's built-in default).
NGINX_ROOT_WORKER = "nobody"


class FirewallError(FedmedError):
    """The firewall table cannot be written or installed."""


def table_name(server: ServerConfig) -> str:
    return f"fedmed_{server.superlink.internal_port}"


def account_uids(users: list[str]) -> list[int]:
    """The uids that may reach the internal port: each named account (default: this one); when that is root,
    also nginx's worker account, which forwards the sites' requests."""
    uids = []
    for user in users or [pwd.getpwuid(os.getuid()).pw_name]:
        try:
            uids.append(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise FirewallError(
                f"no account '{user}' on this machine; give the coordinator's service account"
            ) from None
    if 0 in uids:
        with contextlib.suppress(KeyError):
            uids.append(pwd.getpwnam(NGINX_ROOT_WORKER).pw_uid)
    return sorted(set(uids))


def ruleset(server: ServerConfig, *, uids: list[int]) -> str:
    """The nftables script (idempotent: it replaces the table if it is there)."""
    name, port = table_name(server), server.superlink.internal_port
    allowed = "{ " + ", ".join(str(uid) for uid in uids) + " }"
    return f"""# fedmed: only uids {", ".join(map(str, uids))} may connect to the SuperLink of '{server.federation}'
# on 127.0.0.1:{port}. Install: fedmed server firewall SERVER_TOML --install (as root), or nft -f FILE.
table inet {name}
delete table inet {name}
table inet {name} {{
    chain output {{
        type filter hook output priority 0; policy accept;
        ip daddr 127.0.0.0/8 tcp dport {port} meta skuid != {allowed} counter reject with tcp reset
        ip6 daddr ::1 tcp dport {port} meta skuid != {allowed} counter reject with tcp reset
    }}
}}
"""


def _nft() -> str:
    found = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)
    if found is None:
        raise FirewallError("nft is not installed: 'sudo apt install nftables' (or print the rules and adapt them)")
    return found


def install(server: ServerConfig, *, uids: list[int]) -> str:
    """Load the table into the kernel now; returns its name. Not persistent across reboots by itself."""
    completed = subprocess.run([_nft(), "-f", "-"], input=ruleset(server, uids=uids), capture_output=True, text=True)
    if completed.returncode != 0:
        raise FirewallError(
            f"nft refused the table ({completed.stderr.strip()}); run this as root, on a kernel with nf_tables"
        )
    return table_name(server)


def remove(server: ServerConfig) -> bool:
    """Delete the table; False when it was not there."""
    completed = subprocess.run([_nft(), "delete", "table", "inet", table_name(server)], capture_output=True, text=True)
    return completed.returncode == 0
