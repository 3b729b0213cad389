"""Triton model repositories: publish parity-checked builds, validate them, serve them locally."""

from mpdeploy.serving.check import check_repository, format_problems
from mpdeploy.serving.repository import PublishedModel, publish
from mpdeploy.serving.server import TritonServer, serve

__all__ = [
    "PublishedModel",
    "TritonServer",
    "check_repository",
    "format_problems",
    "publish",
    "serve",
]
