"""The Ray cluster a study runs on, refused in seconds when it is not there: nothing here imports
torch or Ray Tune, so the CLI checks ``--address`` first, before the seconds those take."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from guidance_tune.config import ConfigError

JOIN_PROBE_SECONDS = 3.0  # a cluster's GCS port accepts at once; silence means nothing is there


def ray_address(address: str | None) -> str:
    """The Ray a study runs on: ``address`` (--address), else $RAY_ADDRESS, else "local", a new
    local Ray rather than Ray's default: a cluster some other job left running on this machine
    is not silently joined.

    One to join is refused in seconds when nothing listens there: Ray itself retries for 14
    minutes, with a warning every few seconds and Ctrl-C taking half a minute to act.
    """
    if address:
        given, instead = f"--address {address}", "drop --address"
    elif address := os.environ.get("RAY_ADDRESS"):
        given, instead = f"$RAY_ADDRESS={address}", "unset RAY_ADDRESS"
    else:
        return "local"
    if address == "local":
        return address
    try:
        host, port = _gcs_endpoint(address)
        speaks = _speaks_grpc(host, port)
    except (OSError, ValueError) as error:  # nothing there, "auto" found none, or not host:port
        reason = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            f"{given}: no Ray cluster to join ({reason}); start one with `ray start --head`, "
            f"or {instead} to run the study on a new local Ray"
        ) from None
    if not speaks:
        raise ConfigError(
            f"{given}: {host}:{port} answers, but not as a Ray cluster (no gRPC there); give "
            f"the head's GCS address (`ray start --head` prints it), or {instead}"
        )
    return address


# An HTTP/2 client's first bytes: its preface and an empty SETTINGS frame
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_grpc(host: str, port: int) -> bool:
    """Whether ``host:port`` answers as a gRPC server does (Ray's GCS and its client server
    are): its first frame is SETTINGS. Ray, joining anything else, tries for about 40 s."""
    with socket.create_connection((host, port), timeout=JOIN_PROBE_SECONDS) as connection:
        connection.sendall(HTTP2_HELLO)
        try:
            frame = connection.recv(9)
        except TimeoutError:
            return False
    return len(frame) == 9 and frame[3] == 4  # the frame header's type byte


def _gcs_endpoint(address: str) -> tuple[str, int]:
    """Where ray.init will connect for ``address``: a Ray Client server for ray://, else the
    GCS, found the way Ray finds it ("auto" asks Ray's discovery; loopback names this node)."""
    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        client = urlsplit(address)
        if client.port is None:
            raise ValueError("a ray:// address needs the Ray Client port, e.g. ray://head:10001")
        return client.hostname or "", client.port
    host, _, port = canonicalize_bootstrap_address(address).rpartition(":")
    return host.strip("[]"), int(port)
