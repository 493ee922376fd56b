"""The SuperNode presents the site's TLS client certificate to the coordinator's front proxy.

Flower 1.41's Fleet HTTP client verifies the server with the CA but has no option for a client
certificate. fedmed's SuperNode wrapper takes two extra options (removed before Flower parses its
command line) and makes every Fleet client it builds use an SSL context holding the site's
certificate and key, next to the federation CA.
"""

from __future__ import annotations

import ssl
from typing import Any

CERTIFICATE_OPTION = "--fedmed-client-certificate"
KEY_OPTION = "--fedmed-client-key"
ROOT_CERTIFICATES_OPTION = "--root-certificates"  # Flower's own option: read, left in place


def client_context(*, ca_certificate: str, certificate: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certificate)
    context.load_cert_chain(certfile=certificate, keyfile=key)
    return context


def take_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv without fedmed's options, and their values (plus the CA Flower was given)."""
    rest, found, index = [], {}, 0
    while index < len(argv):
        if argv[index] in (CERTIFICATE_OPTION, KEY_OPTION) and index + 1 < len(argv):
            found[argv[index]] = argv[index + 1]
            index += 2
            continue
        if argv[index] == ROOT_CERTIFICATES_OPTION and index + 1 < len(argv):
            found[ROOT_CERTIFICATES_OPTION] = argv[index + 1]
        rest.append(argv[index])
        index += 1
    return rest, found


def present_client_certificate(argv: list[str]) -> list[str]:
    """Make the SuperNode's Fleet connections present the certificate named in argv; returns the rest of argv."""
    rest, found = take_options(argv)
    if CERTIFICATE_OPTION not in found:
        return rest
    from flwr.supernode import fleet_http_connection

    context = client_context(
        ca_certificate=found[ROOT_CERTIFICATES_OPTION], certificate=found[CERTIFICATE_OPTION], key=found[KEY_OPTION]
    )
    base = fleet_http_connection.FleetHttpClient

    class MutualTlsFleetClient(base):  # type: ignore[misc, valid-type]
        @classmethod
        def from_server_address(
            cls, server_address: str, insecure: bool, root_certificates: Any, interceptors: Any, **kwargs: Any
        ) -> Any:
            # One context for every reconnect: the proxy requires it, and it resumes TLS sessions.
            return cls(f"https://{server_address}", interceptors=interceptors, verify=context, **kwargs)

    fleet_http_connection.FleetHttpClient = MutualTlsFleetClient
    return rest
