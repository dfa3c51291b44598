"""Starting a local Ray, or joining a cluster, with one-line failures instead of a minute of retries."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import ray

# How long a cluster's GCS port may take to accept a connection before the sweep gives up.
RAY_CONNECT_TIMEOUT_S = 5.0


class RayUnreachable(ConnectionError):
    """Nothing answers at the Ray address a sweep was told to join."""


def _host_port(address: str) -> tuple[str, int] | None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    return (host.strip("[]"), int(port)) if sep and host and port.isdigit() else None


def check_ray_address(address: str) -> None:
    """Fail in seconds, naming the address, where ray.init would retry a dead cluster's GCS for a minute.

    `auto` is resolved as ray.init resolves it: RAY_ADDRESS if set, else the address the last `ray start`
    on this machine left in Ray's temp dir. Ray's last resort for `auto`, any GCS process `ps` shows, is
    refused here: on a shared machine that is someone else's local Ray.
    """
    target, origin = address, "--address"
    if address == "auto":
        from ray._common.utils import (
            get_ray_address_file,  # Ray 2.60's own location of that file
        )

        target, origin = os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"
        if not target:
            origin = get_ray_address_file(None)
            try:
                target = Path(origin).read_text().strip()
            except OSError:
                target = ""
            if not target:
                raise RayUnreachable(
                    f"no Ray cluster to join: RAY_ADDRESS is unset and no `ray start` left an address in {origin}"
                )
    hostport = _host_port(target)
    if hostport is None:
        return  # not host:port: ray.init names the problem itself
    try:
        socket.create_connection(hostport, timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnreachable(f"nothing answers at {target} (from {origin}): {exc.strerror or exc}") from None


def start_ray(address: str | None, dashboard_host: str = "127.0.0.1"):
    """Join `address` (e.g. 'auto') or start a local Ray whose dashboard listens on localhost only.

    Without an address Ray is always started afresh, whatever RAY_ADDRESS says (ray.init only reads it
    for no address or 'auto') and whatever a former `ray start` left in Ray's temp dir."""
    global _dashboard
    if ray.is_initialized():  # the second stage of a two-stage sweep runs on the Ray the first one started
        return _dashboard
    if address is not None:
        check_ray_address(address)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A failed trial's traceback goes to trials/<id>/error.txt, not the terminal: the sweep's closing lines
    # name each errored trial and its file.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Each evaluation checkpoints; Tune's advice to checkpoint less is noise for GAN sweeps.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        kwargs.update(include_dashboard=True, dashboard_host=dashboard_host)
    # "local" always starts a fresh Ray: never the stale or foreign cluster a former `ray start` left
    # in Ray's temp dir (which ray.init() with no address would join).
    context = ray.init(address=address if address is not None else "local", **kwargs)
    url = context.dashboard_url
    _dashboard = f"http://{url}" if url and not url.startswith("http") else url
    return _dashboard


_dashboard: str | None = None
