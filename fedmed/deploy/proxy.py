"""The coordinator's front door: Debian's nginx on the public port, in front of a loopback-bound SuperLink.

Flower 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API (start, stop and list runs,
register nodes) and the runtime API on one HTTPS port, and checks no client certificate. So the
SuperLink listens on 127.0.0.1 only, and the one public port is nginx's, which lets a request through
only when all of these hold:

- the TLS client certificate is signed by the federation CA (`ssl_verify_client on`);
- its fingerprint is enrolled (a `map` over `$ssl_client_fingerprint` to the site's name, from a file fedmed
  writes from `site-certs/`; removing a site rewrites it and reloads nginx, which revokes at once). The access
  log names that site on each request: the coordinator counts each site's bytes from it;
- it is a POST to one of the Fleet endpoints a SuperNode uses. Node registration, the Control API and
  the runtime API are not among them: those stay with the coordinator, on loopback;
- its body is no larger than Flower's largest message part needs (`max_request_bytes`): nginx answers
  413 before the SuperLink reads a byte of a larger one.

nginx runs in the foreground under fedmed's supervisor, with its pid file, temporary files and access
log in the server's state folder and its error log on stderr (the server log).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from pathlib import Path

from fedmed.config import ServerConfig
from fedmed.config.sites import SITE_NAME_PATTERN
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.flower.runtime.environment import largest_message_part

from . import pki, site_certs

# What a SuperNode sends (flwr 1.41, fleet router) less register-node/unregister-node: enrolment is the
# coordinator's alone.
FLEET_ENDPOINTS = (
    "activate-node",
    "deactivate-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
NGINX_LOCATIONS = (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx"), Path("/usr/local/nginx/sbin/nginx"))
# The name nginx checks the SuperLink's certificate against: provisioning always certifies it.
UPSTREAM_NAME = "localhost"
MIB = 1024 * 1024
DEFAULT_MAX_REQUEST_MIB = 16


class ProxyError(FedmedError):
    """The front proxy cannot be set up or started."""


def proxy_dir(server: ServerConfig) -> Path:
    return server.proxy_dir


def config_file(server: ServerConfig) -> Path:
    return proxy_dir(server) / "nginx.conf"


def enrolled_file(server: ServerConfig) -> Path:
    return proxy_dir(server) / "enrolled.map"


def pid_file(server: ServerConfig) -> Path:
    return proxy_dir(server) / "nginx.pid"


def find_nginx() -> str:
    """The nginx binary; fails with how to install it."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in NGINX_LOCATIONS:
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ProxyError(
        "nginx is not installed; the coordinator's public port is served by nginx in front of the SuperLink. "
        "Install it with 'sudo apt install nginx' (fedmed runs its own instance; the system service can stay "
        "disabled: 'sudo systemctl disable --now nginx')"
    )


def command(server: ServerConfig) -> list[str]:
    """nginx in the foreground with fedmed's config; errors before the config is read go to stderr too."""
    prefix = proxy_dir(server)
    return [find_nginx(), "-e", "stderr", "-p", f"{prefix}/", "-c", str(config_file(server)), "-g", "daemon off;"]


def max_request_bytes(server: ServerConfig) -> int:
    """The largest request body the public port lets through (nginx answers 413 above it, before the
    SuperLink reads a byte): server.toml's superlink.max_request_mb, or three of Flower's largest message
    parts with a 16 MiB floor. Flower splits arrays into chunks, so no model size needs more."""
    if server.superlink.max_request_mb is not None:
        return int(server.superlink.max_request_mb * MIB)
    return max(DEFAULT_MAX_REQUEST_MIB * MIB, 3 * largest_message_part())


def enrolled_sites(server: ServerConfig) -> dict[str, str]:
    """site -> fingerprint of each enrolled certificate that the federation CA signed."""
    enrolled = {}
    folder = server.site_certificates
    for path in sorted(folder.glob("*.crt")) if folder.is_dir() else []:
        if not re.fullmatch(SITE_NAME_PATTERN, path.stem):  # the name goes into nginx's config as it is
            raise ProxyError(f"{path}: '{path.stem}' is not a site name ({SITE_NAME_PATTERN}); rename or remove it")
        certificate = pki.load_certificate(path)
        site_certs.check_issued_by(certificate, certificate_path=path, ca_certificate_path=server.tls.ca_certificate)
        enrolled[path.stem] = site_certs.fingerprint(certificate)
    return enrolled


def render_enrolled(server: ServerConfig) -> Path:
    """Write the allow-list of client certificates nginx includes; returns its path."""
    lines = [f'{fingerprint} "{site}";' for site, fingerprint in enrolled_sites(server).items()]
    path = enrolled_file(server)
    write_text_atomic(path, "# written by fedmed from site-certs/; do not edit\n" + "".join(f"{x}\n" for x in lines))
    return path


def render_config(server: ServerConfig) -> Path:
    """Write nginx.conf (and the allow-list) into the server's state folder; returns the config's path."""
    prefix = proxy_dir(server)
    for folder in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    render_enrolled(server)
    text = f"""# fedmed's front proxy for '{server.federation}', written by 'fedmed server start'; do not edit.
worker_processes 1;
pid {pid_file(server)};
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    server_tokens off;
    # The enrolled site first: the coordinator counts each site's bytes from this log (fedmed.runs.proxy_traffic).
    log_format fedmed '$time_iso8601 $remote_addr "$fedmed_site" "$ssl_client_s_dn" $ssl_client_fingerprint "$request" '
                      '$status $request_length $bytes_sent $request_time';
    access_log {prefix}/access.log fedmed;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    # Enrolled site certificates by fingerprint, to the site's name; anything else maps to "".
    map $ssl_client_fingerprint $fedmed_site {{
        default "";
        include {enrolled_file(server)};
    }}

    upstream fedmed_superlink {{
        server {server.superlink.internal_address};
        # Reused HTTPS connections: a round is a chain of small requests, and a handshake each would add up.
        keepalive 32;
    }}

{_server_block(server)}}}
"""
    path = config_file(server)
    write_text_atomic(path, text)
    return path


def _server_block(server: ServerConfig) -> str:
    """nginx's server block: mutual TLS on the public port, and only the Fleet API's POSTs go through."""
    host = server.superlink.host
    listen = f"[{host}]:{server.superlink.port}" if ":" in host else f"{host}:{server.superlink.port}"
    endpoints = "|".join(FLEET_ENDPOINTS)
    return f"""    server {{
        listen {listen} ssl;
        ssl_certificate {server.tls.certificate};
        ssl_certificate_key {server.tls.private_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:fedmed_tls:1m;
        ssl_client_certificate {server.tls.ca_certificate};
        ssl_verify_client on;
        ssl_verify_depth 1;

        # Flower sends a model in chunks of at most a few MiB, one request each: a larger body is not a site's.
        client_max_body_size {max_request_bytes(server) // 1024}k;
        # Rounds can wait long on slow sites.
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;
        proxy_request_buffering off;
        proxy_buffering off;

        if ($fedmed_site = "") {{
            return 403;
        }}

        location ~ ^/v1/fleet/({endpoints})$ {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://fedmed_superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {server.tls.ca_certificate};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 1;
            proxy_ssl_name {UPSTREAM_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}

        location / {{
            return 403;
        }}
    }}
"""


def reload(server: ServerConfig) -> bool:
    """Re-read the allow-list now if the proxy runs (SIGHUP: nginx swaps config without dropping the port).

    Returns True when a running proxy was told; False when none runs (it reads the list when it starts).
    """
    render_enrolled(server)
    try:
        pid = int(pid_file(server).read_text().strip())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    # A pid file left by a crash may name a process that is not nginx now: never signal that one.
    if b"nginx" not in command_line:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGHUP)
        logger.info("front proxy (pid %d) reloads its allow-list of site certificates", pid)
        return True
    return False
