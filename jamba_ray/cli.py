"""`jamba-ray` (same as `python -m jamba_ray`): init-tiny, plan, generate, serve, score,
serve-config."""

from __future__ import annotations

import argparse
import sys

from . import commands
from .batch.score_config import BATCH_SIZE, TASKS, TOO_LONG, ScoreConfig
from .config.engine_config import BALANCES, TRANSPORTS, default_of, option_default
from .config.pipeline_file import PipelineFile
from .errors import JambaRayError
from .tiny import PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jamba-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("init-tiny", help="write a tiny random Jamba checkpoint + tokenizer")
    t.add_argument("dir", help="directory to write the checkpoint into (created if missing)")
    t.add_argument(
        "--preset",
        default="tiny",
        choices=tuple(PRESETS),
        help="tiny (tests, the default model) or small (benchmarks)",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    t.add_argument(
        "--max-shard-size", default="200KB", help="safetensors shard size (default 200KB)"
    )
    t.add_argument(
        "--classifier",
        type=int,
        default=0,
        metavar="K",
        help="also write a K-label sequence-classification head (score.weight)",
    )
    t.set_defaults(fn=commands.init_tiny)

    pl = sub.add_parser("plan", help="print the per-stage partition table (no weights needed)")
    pl.add_argument("--model", help="checkpoint dir or config.json")
    pl.add_argument("--config", help="pipelines/*.yaml: also checks each stage's memory fit")
    stages = option_default("num_stages")
    pl.add_argument(
        "--stages", type=int, default=stages, help=f"number of stages (default {stages})"
    )
    pl.add_argument("--slices", help='explicit slices as JSON, e.g. "[[0,3],[3,8]]"')
    pl.add_argument(
        "--dtype",
        default=None,
        help="weight dtype for the sizes (default: the checkpoint's torch_dtype, else float32)",
    )
    pl.add_argument(
        "--balance",
        default=option_default("balance"),
        choices=BALANCES,
        help=f"what stages are balanced by (default {option_default('balance')})",
    )
    pl.set_defaults(fn=commands.plan)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument(
        "--model", default=None, help="checkpoint dir or hub id (default: the tiny model)"
    )
    stages = option_default("num_stages")
    g.add_argument("--stages", type=int, default=stages, help=f"pipeline stages (default {stages})")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt (default 32)")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    g.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    dtype = option_default("dtype")
    g.add_argument("--dtype", default=dtype, help=f"weight dtype (default {dtype})")
    g.add_argument(
        "--cpus-per-stage",
        type=float,
        default=option_default("num_cpus_per_stage"),
        help="CPUs reserved per stage (default: an equal share of the free CPUs, at most 1)",
    )
    g.add_argument(
        "--transport",
        default=option_default("transport"),
        choices=TRANSPORTS,
        help="hidden states between stages",
    )
    g.add_argument(
        "--decode-graphs",
        action="store_true",
        help="fixed-shape decode steps (CUDA graphs on GPUs)",
    )
    g.set_defaults(fn=commands.generate)

    s = sub.add_parser("serve", help="serve over HTTP (OpenAI API) and gRPC with Ray Serve")
    s.add_argument(
        "--model",
        default=None,
        help="checkpoint dir or hub id (default: the pipeline's, else the auto-created tiny model)",
    )
    s.add_argument(
        "--config",
        action="append",
        default=None,
        help="pipelines/*.yaml (default: the built-in tiny-cpu); repeat it to serve one model "
        "per file in one app (the flags and the first file's serve section set the app's options)",
    )
    s.add_argument(
        "--stages", type=int, default=None, help="pipeline stages (default: the layout's)"
    )
    s.add_argument(
        "--transport",
        default=None,
        choices=TRANSPORTS,
        help="hidden states between stages "
        "(default: the pipeline's, auto = compiled for 2+ GPU stages)",
    )
    s.add_argument(
        "--decode-graphs",
        action="store_true",
        help="fixed-shape decode steps (CUDA graphs on GPUs)",
    )
    layout = PipelineFile.default().serve  # what serve flags left out keep
    s.add_argument("--host", default=None, help=f"bind address (default {layout.host})")
    s.add_argument("--port", type=int, default=None, help=f"HTTP port (default {layout.port})")
    s.add_argument(
        "--grpc-port", type=int, default=None, help=f"gRPC proxy port (default {layout.grpc_port})"
    )
    s.add_argument("--no-grpc", action="store_true", help="do not start the gRPC proxy")
    s.add_argument(
        "--min-replicas", type=int, default=None, help="fewest pipelines (default: the layout's)"
    )
    s.add_argument(
        "--max-replicas", type=int, default=None, help="most pipelines (default: the layout's)"
    )
    s.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="requests per replica autoscaling aims at (default: the layout's)",
    )
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: jamba-tiny, else the checkpoint's dir name)",
    )
    s.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (HTTP and gRPC)"
    )
    s.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    s.set_defaults(fn=commands.serve)

    b = sub.add_parser("score", help="offline batch job on Ray Data: loglik / classify / generate")
    b.add_argument("--model", required=True, help="checkpoint dir or hub id")
    b.add_argument(
        "--input", required=True, help="JSONL or Parquet (any filesystem Ray Data reads)"
    )
    b.add_argument("--output", required=True, help="directory of Parquet parts (rerun resumes)")
    task = default_of(ScoreConfig, "task")
    b.add_argument(
        "--task", default=task, choices=TASKS, help=f"what each row gets (default {task})"
    )
    text = default_of(ScoreConfig, "text_column")
    b.add_argument("--text-column", default=text, help=f"the column scored (default {text})")
    b.add_argument(
        "--id-column", default=default_of(ScoreConfig, "id_column"), help="row key for resuming"
    )
    b.add_argument("--pipelines", type=int, default=1, help="actor pool size (one pipeline each)")
    b.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"rows per batch (default {BATCH_SIZE})"
    )
    stages = option_default("num_stages")
    b.add_argument(
        "--stages", type=int, default=stages, help=f"stages per pipeline (default {stages})"
    )
    b.add_argument(
        "--cpus-per-stage",
        type=float,
        default=option_default("num_cpus_per_stage"),
        help="CPUs reserved per stage (default: an equal share of the free CPUs, at most 1)",
    )
    b.add_argument(
        "--max-model-len",
        type=int,
        default=option_default("max_model_len"),
        help="longest row in tokens (default: the model's, capped by memory)",
    )
    b.add_argument(
        "--max-batched-tokens",
        type=int,
        default=option_default("max_batched_tokens"),
        help="prefill chunk size",
    )
    b.add_argument(
        "--too-long",
        default=default_of(ScoreConfig, "too_long"),
        choices=TOO_LONG,
        help="a row over --max-model-len: an error row, or its first tokens (default error)",
    )
    b.add_argument(
        "--token-logprobs", action="store_true", help="loglik: also each token's log-probability"
    )
    b.add_argument("--max-tokens", type=int, default=16, help="generate: tokens per row")
    b.add_argument(
        "--temperature", type=float, default=0.0, help="generate: temperature (default 0)"
    )
    b.add_argument("--seed", type=int, default=None, help="generate: sampling seed")
    b.add_argument(
        "--retry-errors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a rerun, score rows that failed before again (default: yes)",
    )
    b.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="print progress this often (default 10; 0: only at the end)",
    )
    b.add_argument("--verbose", action="store_true", help="Ray Data's progress bars and INFO logs")
    b.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    b.set_defaults(fn=commands.score)

    sc = sub.add_parser(
        "serve-config", help="print a Serve config (serve run/deploy, KubeRay) for a pipeline"
    )
    sc.add_argument(
        "--config", action="append", required=True, help="pipelines/*.yaml (repeat: one model each)"
    )
    sc.set_defaults(fn=commands.serve_config)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # `serve` runs itself again in a detached child with the same arguments
    try:
        return args.fn(args)
    except JambaRayError as e:
        print(f"jamba-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
