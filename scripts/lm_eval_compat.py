"""lm-evaluation-harness against the server, checked against lm-eval's own `hf` backend.

    .venv/bin/python scripts/lm_eval_compat.py --lm-eval-python /tmp/lmenv/bin/python
        [--model DIR] [--port P] [--atol 1e-4] [--workdir DIR]

Starts `jamba-ray serve --stages 1` on the checkpoint (default: a fresh tiny one from
`jamba-ray init-tiny`), waits for /health, then runs lm-eval's Python API on the local tasks in
scripts/lm_eval_task/ (12 questions; `jamba_compat_mc` scores choices, `jamba_compat_gen`
generates at most 8 tokens greedily), with log_samples, in two pairs:

  local-completions (add_bos_token=True)    vs  hf                            mc + gen
  local-chat-completions                    vs  hf, apply_chat_template=True  gen

`hf` loads the same checkpoint in float32. The check passes when each request's log-likelihood
is within --atol and each generation is the same string; it prints a table and exits 1 otherwise.

Only the eval side needs lm-eval: `pip install "lm-eval[api]"` (it brings torch and transformers
for `hf`) in this interpreter, or in the one named by --lm-eval-python (a separate virtualenv keeps
the project's own untouched); the script re-runs itself there in eval mode. The server side runs
`python -m jamba_ray` with --server-python (default: this interpreter). Offline throughout: the
data are scripts/lm_eval_task/compat.jsonl, and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "scripts" / "lm_eval_task"
MC, GEN = "jamba_compat_mc", "jamba_compat_gen"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: a new tiny one in --workdir)")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--atol", type=float, default=1e-4, help="log-likelihood tolerance")
    p.add_argument("--workdir", help="checkpoint, JAMBA_RAY_CACHE and server log (default: temp)")
    p.add_argument("--server-python", default=sys.executable, help="has jamba_ray")
    p.add_argument("--lm-eval-python", default=sys.executable, help="has lm_eval")
    p.add_argument("--eval-against", metavar="URL", help=argparse.SUPPRESS)  # eval mode
    p.add_argument("--served-name", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.eval_against:
        return evaluate(args.eval_against, args.served_name, args.model, args.atol)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lm-eval-compat-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return orchestrate(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


# ---- server side (stdlib only) ------------------------------------------------------------------


def orchestrate(args: argparse.Namespace, workdir: Path) -> int:
    env = {**os.environ, **OFFLINE, "JAMBA_RAY_CACHE": str(workdir / "cache")}
    model = Path(args.model or build_checkpoint(args.server_python, workdir / "tiny", env))
    port = args.port or free_port()
    log = workdir / "server.log"
    server = start_server(args.server_python, model, port, env, log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(server, base, log)
        name = served_name(base)
        print(f"lm-eval-compat: serving {model} as {name!r} on {base}", flush=True)
        cmd = [args.lm_eval_python, __file__, "--eval-against", base, "--served-name", name]
        cmd += ["--model", str(model.resolve()), "--atol", str(args.atol)]
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode
    finally:
        stop_server(server)


def build_checkpoint(python: str, out: Path, env: dict) -> Path:
    subprocess.run([python, "-m", "jamba_ray", "init-tiny", str(out)], env=env, check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(python: str, model: Path, port: int, env: dict, log: Path) -> subprocess.Popen:
    cmd = [python, "-m", "jamba_ray", "serve", "--model", str(model), "--stages", "1"]
    cmd += ["--no-grpc", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(server: subprocess.Popen, base: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited ({server.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"server not healthy after {timeout_s:.0f} s:\n{tail(log)}")


def served_name(base: str) -> str:
    with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM lets `serve` drain Serve and stop its Ray instance; kill only if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ---- eval side (needs lm_eval) ------------------------------------------------------------------


def evaluate(base: str, name: str, model: str, atol: float) -> int:
    """Four lm-eval runs, then the per-request comparison (run from the repo root: the task
    YAMLs name their data relative to it)."""
    os.chdir(ROOT)
    completions = dict(base_url=f"{base}/v1/completions", model=name, tokenizer=model)
    completions |= dict(tokenizer_backend="huggingface", tokenized_requests=True)
    completions |= dict(add_bos_token=True, max_retries=1, batch_size=4)
    # No tokenizer on the chat side, so lm-eval cannot tell its EOS string; `hf` adds it to `until`.
    chat = dict(base_url=f"{base}/v1/chat/completions", model=name, max_retries=1)
    chat |= dict(eos_string=eos_string(model))
    hf = dict(pretrained=model, dtype="float32", device="cpu")
    runs = {
        "local-completions": run_lm_eval("local-completions", completions, [MC, GEN]),
        "hf": run_lm_eval("hf", hf, [MC, GEN]),
        "local-chat-completions": run_lm_eval("local-chat-completions", chat, [GEN], chat=True),
        "hf, apply_chat_template": run_lm_eval("hf", hf, [GEN], chat=True),
    }
    rows = [
        loglik_row("local-completions", "hf", MC, runs, atol),
        generation_row("local-completions", "hf", GEN, runs),
        generation_row("local-chat-completions", "hf, apply_chat_template", GEN, runs),
    ]
    print_report(rows, runs)
    return 0 if all(r["ok"] for r in rows) else 1


def eos_string(model: str) -> str:
    eos = json.loads((Path(model) / "tokenizer_config.json").read_text())["eos_token"]
    return eos["content"] if isinstance(eos, dict) else eos  # older configs: an AddedToken


def run_lm_eval(model: str, model_args: dict, tasks: list[str], chat: bool = False) -> dict:
    """lm-eval's samples and metrics of one run: {task: {doc_id: [response per request]}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    batch = model_args.pop("batch_size", 1)
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=dict(model_args),
        tasks=tasks,
        batch_size=batch,
        task_manager=manager,
        log_samples=True,
        apply_chat_template=chat,
        bootstrap_iters=0,
    )
    samples = {
        task: {s["doc_id"]: [r[0] for r in s["resps"]] for s in docs}
        for task, docs in out["samples"].items()
    }
    metrics = {task: out["results"][task] for task in tasks}
    return {"samples": samples, "metrics": metrics}


def loglik_row(model: str, ref: str, task: str, runs: dict, atol: float) -> dict:
    got, want = runs[model]["samples"][task], runs[ref]["samples"][task]
    pairs = [(g, w) for d in sorted(want) for g, w in zip(got[d], want[d], strict=True)]
    diff = max(abs(g[0] - w[0]) for g, w in pairs)
    greedy = sum(bool(g[1]) == bool(w[1]) for g, w in pairs)
    row = dict(model=model, ref=ref, task=f"{task} (loglikelihood)", n=len(pairs))
    return row | dict(diff=diff, greedy=greedy, same=None, ok=diff <= atol, bad=[])


def generation_row(model: str, ref: str, task: str, runs: dict) -> dict:
    got, want = runs[model]["samples"][task], runs[ref]["samples"][task]
    pairs = [(d, got[d][0], want[d][0]) for d in sorted(want)]
    bad = [(d, g, w) for d, g, w in pairs if g != w]
    row = dict(model=model, ref=ref, task=f"{task} (generate_until)", n=len(pairs))
    return row | dict(diff=None, greedy=None, same=len(pairs) - len(bad), ok=not bad, bad=bad)


def print_report(rows: list[dict], runs: dict) -> None:
    print(
        "\n| lm-eval model | reference | task | requests | max abs Δ loglik "
        "| is_greedy agrees | generations identical | ok |"
    )
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        diff = "–" if r["diff"] is None else f"{r['diff']:.2e}"
        greedy = "–" if r["greedy"] is None else f"{r['greedy']}/{r['n']}"
        same = "–" if r["same"] is None else f"{r['same']}/{r['n']}"
        ok = "yes" if r["ok"] else "**NO**"
        print(
            f"| {r['model']} | {r['ref']} | {r['task']} | {r['n']} | {diff} | {greedy} "
            f"| {same} | {ok} |"
        )
    for r in rows:
        for d, g, w in r["bad"][:5]:
            print(f"  {r['model']} doc {d}: {g!r} != {r['ref']} {w!r}")
    for run in ("local-completions", "local-chat-completions"):
        got = runs[run]["samples"][GEN]
        print(f"{run} generations, first 3: " + ", ".join(repr(got[d][0]) for d in sorted(got)[:3]))
    print()
    for run, out in runs.items():
        print(f"{run}: " + "; ".join(metric_line(t, m) for t, m in out["metrics"].items()))
    print(versions())


def metric_line(task: str, metrics: dict) -> str:
    values = {k.split(",")[0]: v for k, v in metrics.items() if "stderr" not in k and "," in k}
    return f"{task} " + ", ".join(f"{k}={v:.3f}" for k, v in values.items())


def versions() -> str:
    from importlib.metadata import version

    pkgs = ("lm_eval", "transformers", "torch", "tokenizers", "datasets")
    return "versions (eval side): " + ", ".join(f"{p} {version(p)}" for p in pkgs)


if __name__ == "__main__":
    sys.exit(main())
