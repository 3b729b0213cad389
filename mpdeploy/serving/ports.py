"""Ports for the local Triton server: valid, distinct and free before the server is started."""

from __future__ import annotations

import errno
import socket

from mpdeploy.errors import UserError

HOST = "127.0.0.1"


def check_ports(http_port: int, grpc_port: int, host: str = HOST) -> None:
    """UserError (one line) unless both ports are in 1..65535, different, and free on `host`.

    Triton itself would take an out-of-range port silently or print a scrap of its help text;
    a taken port would only show as a server that exits while starting.
    """
    ports = {"--http-port": http_port, "--grpc-port": grpc_port}
    for flag, port in ports.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise UserError(f"{flag} must be a port number in 1..65535 (got {port})")
    if http_port == grpc_port:
        raise UserError(f"--http-port and --grpc-port are both {http_port}; give them two ports")
    for flag, port in ports.items():
        reason = port_problem(port, host)
        if reason:
            raise UserError(f"{flag} {port}: {reason} on {host}; choose another port")


def port_problem(port: int, host: str = HOST) -> str | None:
    """Why a server could not listen on host:port now, or None if it could."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as servers set it: a port in TIME_WAIT is free, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "already in use"
            return exc.strerror or "cannot be bound"
    return None
