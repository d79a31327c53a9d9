"""Serve's gRPC proxy binds `[::]` (every interface) whatever the HTTP host is; this makes it bind
the server's host instead (127.0.0.1 by default), as the HTTP proxy does.

`serve` starts Ray with `setup_hook` as its workers' `worker_process_setup_hook` and the host in
`GRPC_HOST_ENV`. The hook runs in every worker of the job, stages included, so it does not import
Serve (1.6 s); it patches Serve's bind helper when, and if, that worker imports it (the proxy).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

GRPC_HOST_ENV = "JAMBA_RAY_GRPC_HOST"
SETUP_HOOK = "jamba_ray.serve.grpc_bind.setup_hook"
TARGET = "ray.serve._private.default_impl"  # holds add_grpc_address(server, "[::]:PORT")
ANY = "[::]:"


def runtime_env(host: str) -> dict:
    """The job's runtime_env that makes its Serve gRPC proxy bind `host`."""
    return {"worker_process_setup_hook": SETUP_HOOK, "env_vars": {GRPC_HOST_ENV: host}}


def bind_address(address: str, host: str) -> str:
    """`[::]:PORT` -> `host:PORT` (IPv6 literals bracketed); any other address unchanged."""
    if not address.startswith(ANY):
        return address
    return f"{f'[{host}]' if ':' in host else host}:{address[len(ANY) :]}"


def patch(module) -> None:
    host = os.environ.get(GRPC_HOST_ENV)
    original = module.add_grpc_address
    if not host or getattr(original, "jamba_ray_host", None):
        return

    def add_grpc_address(server, address: str):
        return original(server, bind_address(address, host))

    add_grpc_address.jamba_ray_host = host
    module.add_grpc_address = add_grpc_address


def setup_hook() -> None:
    if not os.environ.get(GRPC_HOST_ENV):
        return
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when TARGET is imported, it lets the normal finders load it, then
    patches the loaded module."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec
