"""Start Serve (HTTP on loopback by default, optional gRPC proxy) and run the app on it."""

from __future__ import annotations

import logging
import re

from ray import serve
from ray.serve.config import gRPCOptions

from ..config.engine_config import PipelineConfig
from ..config.pipeline_file import PipelineFile
from ..errors import StartupError
from ..logs import ANSI
from .app import INGRESS, deployment

log = logging.getLogger(__name__)

APP_NAME = "jamba"
GRPC_SERVICER = "jamba_ray.proto.jamba_pb2_grpc.add_JambaServiceServicer_to_server"


def start(configs: PipelineConfig | list[PipelineConfig], blocking: bool = False):
    """Deploy the app (one model per pipeline; the first one's serve section sets ports and the
    front) on the running Ray cluster; returns the ingress handle."""
    configs = [configs] if isinstance(configs, PipelineConfig) else configs
    opts = configs[0].serve
    grpc = None
    if opts.grpc_port:
        grpc = gRPCOptions(port=opts.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])
    serve.start(http_options={"host": opts.host, "port": opts.port}, grpc_options=grpc)
    app = deployment(configs)
    # serve.run() connects to the Serve just started with the options above and says it will not
    # apply its own (defaults nobody passed): true, and misleading, so not shown.
    quiet = _DropMessage("New http_options/controller_options will not be applied")
    serve_log = logging.getLogger("ray.serve")
    serve_log.addFilter(quiet)
    try:
        handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:  # DEPLOY_FAILED: the replica's traceback is in the app's status
        cause = failure_cause(f"{e}\n{deployment_messages()}")
        raise StartupError(f"the replica failed to start: {cause}") from None
    finally:
        serve_log.removeFilter(quiet)
    log.info(
        "serving on http://%s:%d%s",
        opts.host,
        opts.port,
        f" and grpc {opts.host}:{opts.grpc_port}" if grpc else "",
    )
    if blocking:
        import time

        while True:
            time.sleep(3600)
    return handle


_EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Exit)\b.*)$")


def deployment_messages() -> str:
    """What Serve's status says about the app's deployments (a failed constructor's traceback)."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # the status is a courtesy here: the failure itself is already known
        return ""
    if app is None:
        return ""
    # the ingress first: an engine's own failure (the cause) is then the last one said
    ordered = sorted(app.deployments.items(), key=lambda item: item[0] != INGRESS)
    return "\n".join(d.message for _, d in ordered if d.message)


def failure_cause(message: str) -> str:
    """The last `SomeError: why` line of a failed deployment's message (its innermost cause),
    else the message's last line."""
    lines = [ln.strip() for ln in ANSI.sub("", message).splitlines() if ln.strip()]
    causes = [m.group(1) for ln in lines if (m := _EXCEPTION_LINE.match(ln))]
    return causes[-1] if causes else (lines[-1] if lines else "no reason given")


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def serve_config(pipeline_path: str | list[str], pipeline: PipelineFile) -> dict:
    """A Serve config (for `serve run` / `serve deploy` / KubeRay) that runs this pipeline file
    (a list of files: one model each; `pipeline` is the first, whose serve section is the app's)."""
    opts = pipeline.serve
    cfg = {
        "proxy_location": "EveryNode",
        "http_options": {"host": opts.host, "port": opts.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "jamba_ray.serve.app:build_app",
                "args": {"config": pipeline_path},
            }
        ],
    }
    if opts.grpc_port:
        cfg["grpc_options"] = {"port": opts.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    return cfg
