"""The SuperLink's node table with each node's key: `python -m fedmed.flower.runtime.node_table CONNECTION`.

`flwr supernode list --format json` leaves out each node's public key and name, and Flower 1.41 keeps
an unregistered node's row, key included, for good: registering that key again answers "Public key
already in use". To tell which node a site's key belongs to (and whether that node is retired), the
coordinator reads the table through the same Control API call the `flwr` CLI makes, with the Flower
home (FLWR_HOME) fedmed writes for the server. Prints one JSON object, as `flwr ... --format json` does.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization


def key_digest(public_key: Path) -> str:
    """SHA-256 of an OpenSSH public key file in the form the SuperLink stores it (PEM SubjectPublicKeyInfo)."""
    loaded = serialization.load_ssh_public_key(Path(public_key).read_bytes())
    return _digest(
        loaded.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[union-attr]
    )


def _digest(stored: bytes) -> str:
    return hashlib.sha256(stored).hexdigest()


def list_nodes(connection: str) -> list[dict[str, str]]:
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

    client = init_http_client_from_connection(read_superlink_connection(connection))
    try:
        response = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return [
        {
            "node-id": str(node.node_id),
            "status": node.status,
            "name": node.name,
            "key-sha256": _digest(node.public_key),
        }
        for node in response.nodes_info
    ]


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    try:
        payload = {"success": True, "nodes": list_nodes(arguments[0])}
    except (Exception, SystemExit) as error:  # the caller reads the reason from the JSON, as from flwr's
        payload = {"success": False, "error-message": f"{type(error).__name__}: {error}"}
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
