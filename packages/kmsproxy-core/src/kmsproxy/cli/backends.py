"""`kmsproxy backends`: list installed backends and their URI schemes."""

from __future__ import annotations

import argparse

from kmsproxy.plugins.registry import KNOWN_DISTRIBUTIONS, Registry, install_hint


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "backends", help="list installed key backends and their URI schemes"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    registry = Registry.load()
    # Columns: URI schemes, status, and the distribution or how to get it.
    for backend in registry.backends:
        schemes = ", ".join(f"{s}:" for s in backend.schemes)
        distribution = backend.distribution or "registered at run time"
        print(f"{schemes}\tinstalled\t{distribution}")
    for broken in registry.broken:
        print(f"{broken.name}:\tbroken\t{broken.describe()}")
    missing = sorted(
        scheme
        for scheme in set(KNOWN_DISTRIBUTIONS) - set(registry.schemes)
        if not any(broken.handles(scheme) for broken in registry.broken)
    )
    for scheme in missing:
        print(f"{scheme}:\tnot installed\t{install_hint(scheme)}")
    return 0
