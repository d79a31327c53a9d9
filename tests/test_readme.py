"""README.md stays true: its Python blocks and `jamba-ray` command lines run against a tiny model.

What the README must follow for this to pass:
- Python examples are fenced ```python blocks; each runs on its own, top to bottom, in this
  process (one shared local Ray). Without a model they use the tiny default; a model written as a
  string literal `"DIR"`, `"path/or/hub-id"` or `"dir/or/hub-id"` becomes a tiny checkpoint that
  also has a classifier head. Data paths `"data.jsonl"`, `"data.parquet"` (or any
  `"s3://..."`/`"gs://..."` path ending so) become small local files with `id` and `text`.
  Blocks that talk to a running server (they name 127.0.0.1:8000 or :9000, or localhost) run
  against the test session's own server (the `served` fixture of tests/conftest.py, started on first
  use): its ports replace 8000 and 9000 and its model name replaces "jamba-tiny". A block with
  `# readme: skip` never runs.
- Commands are lines of ```bash (or sh, shell, console) blocks that start with `jamba-ray` or
  `python -m jamba_ray` (a `$ ` prompt, `\\` continuations and trailing `# comments` are fine).
  The same placeholders apply as words (`DIR`, `M`, `MODEL`, `DIR_OR_CONFIG`, `PATH`,
  `data.jsonl`, ...), `pipelines/X.yaml` is `pipelines/tiny-cpu.yaml`, other relative paths land
  in a scratch folder. `serve` lines (they run until stopped) and lines with `--address` are not
  run.
- Every `--flag` in a CLI table row (a row starting with a code span naming a command) exists on
  that command.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from jamba_ray.cli import build_parser, main
from jamba_ray.tiny import TinySpec, init_tiny
from tests.serve.conftest import MODEL as SERVED_MODEL

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELLS = {"bash", "sh", "shell", "console"}
SERVER = ("127.0.0.1:8000", "localhost:8000", "127.0.0.1:9000", "localhost:9000")
MODEL_WORDS = {"DIR", "M", "MODEL", "DIR_OR_CONFIG", "path/or/hub-id", "dir/or/hub-id"}
DATA = re.compile(r"^(?:(?:s3|gs)://.*/)?[\w.-]*\.(jsonl|parquet)$|^PATH$")
NEVER = {"serve"}  # runs until stopped


def blocks(langs: set[str]) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang in langs]


def command_lines() -> list[list[str]]:
    out = []
    for body in blocks(SHELLS):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            for prefix in ("jamba-ray ", "python -m jamba_ray "):
                if line.startswith(prefix):
                    out.append(shlex.split(line.removeprefix(prefix), comments=True))
    return out


def table_rows() -> list[tuple[str, list[str]]]:
    rows = re.findall(r"^\| `([a-z][a-z-]*)([^`]*)`", README, re.M)
    return [(cmd, re.findall(r"--[a-z][a-z0-9-]*", rest)) for cmd, rest in rows]


def against(server, code: str) -> str:
    """A server block pointed at the session's server instead of 8000 / 9000 / jamba-tiny."""
    for host in ("127.0.0.1", "localhost"):
        code = code.replace(f"{host}:8000", f"127.0.0.1:{server.http_port}")
        code = code.replace(f"{host}:9000", f"127.0.0.1:{server.grpc_port}")
    return code.replace('"jamba-tiny"', repr(SERVED_MODEL))


@pytest.fixture(scope="module")
def readme_ckpt(tmp_path_factory) -> str:
    """Generation and a classifier head in one checkpoint, as the Python example uses both."""
    return str(init_tiny(tmp_path_factory.mktemp("readme"), TinySpec(classifier_labels=2)))


def test_the_readme_has_examples_to_check():
    assert blocks({"python"}) and table_rows()


@pytest.mark.parametrize("index", range(len(blocks({"python"}))))
def test_python_block_runs(index, readme_ckpt, ray_session, request):
    code = blocks({"python"})[index]
    if "# readme: skip" in code:
        pytest.skip("marked # readme: skip")
    if any(s in code for s in SERVER):
        code = against(request.getfixturevalue("served"), code)
    code = re.sub(r'"([^"\n]*)"', lambda m: literal(m, Path(readme_ckpt)), code)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        for value in namespace.values():  # a failed block must not leave its pipeline behind
            if type(value).__name__ == "LLM":
                value.shutdown()


def literal(m: re.Match, ckpt: Path) -> str:
    new = substitute(m[1], ckpt)
    return m[0] if new == m[1] else repr(new)


def runnable(words: list[str]) -> bool:
    return bool(words) and words[0] not in NEVER and "--address" not in words


@pytest.mark.parametrize("words", [w for w in command_lines() if runnable(w)], ids=" ".join)
def test_command_line_runs(words, readme_ckpt, ray_session, tmp_path, monkeypatch):
    scratch_ckpt = tmp_path / "ckpt"
    shutil.copytree(readme_ckpt, scratch_ckpt)  # init-tiny DIR may overwrite it
    monkeypatch.chdir(tmp_path)
    assert main([substitute(w, scratch_ckpt) for w in words]) == 0


def substitute(word: str, ckpt: Path) -> str:
    """A README placeholder as a real path; data files are made on demand next to `ckpt`."""
    if word in MODEL_WORDS:
        return str(ckpt)
    if word.startswith("pipelines/"):
        return str(ROOT / word.replace("X.yaml", "tiny-cpu.yaml"))
    m = DATA.match(word)
    if m is None:
        return word
    return str(data_file(ckpt.parent / f"readme-data.{m[1] or 'jsonl'}"))


def data_file(path: Path) -> Path:
    import pandas as pd

    rows = pd.DataFrame({"id": [0, 1], "text": ["hello world", "the quick brown fox"]})
    if path.suffix == ".parquet":
        rows.to_parquet(path, index=False)
    else:
        rows.to_json(path, orient="records", lines=True)
    return path


def test_every_flag_in_the_cli_table_exists():
    parsers = build_parser()._subparsers._group_actions[0].choices
    for cmd, flags in table_rows():
        if cmd not in parsers:
            continue
        known = {o for a in parsers[cmd]._actions for o in a.option_strings}
        assert set(flags) <= known, f"README's `{cmd}` row names {set(flags) - known}"


UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
SIZE = re.compile(r"([\d.]+)\s*(B|KiB|MiB|GiB)?")


def sizes(cell: str) -> list[float]:
    """Byte counts of a cell such as "23.76–24.26 GiB" (a unit covers the numbers before it)."""
    found = SIZE.findall(cell.split(" (")[0])
    out, pending = [], []
    for number, unit in found:
        pending.append(float(number))
        if unit:
            out += [n * UNITS[unit] for n in pending]
            pending = []
    return out


def same_range(cell: str, printed: list[str]) -> bool:
    want = sizes(cell)
    got = sorted(sizes(" ".join(printed)))
    lo_hi = [got[0], got[-1]] if got[0] != got[-1] else [got[0]]
    return len(want) == len(lo_hi) and all(abs(w - g) <= 0.01 * g for w, g in zip(want, lo_hi))


def layout_rows() -> list[list[str]]:
    rows = re.findall(r"^\| `([\w.-]+\.yaml)`[^|]*\|(.*)\|\s*$", README, re.M)
    return [[name, *(c.strip() for c in rest.split("|"))] for name, rest in rows]


@pytest.mark.parametrize("row", layout_rows(), ids=lambda r: r[0])
def test_the_layout_table_is_what_plan_prints(row, capsys):
    name, _, weights, pool, total_device, sequences = row
    assert main(["plan", "--config", str(ROOT / "pipelines" / name)]) == 0
    out = capsys.readouterr().out
    fit = re.findall(
        r"^\s+\d+\s+([\d.]+ \w+)\s+([\d.]+ \w+)\s+[\d.]+ \w+\s+([\d.]+ \w+)\s+(\S+ \w+|-)",
        out,
        re.M,
    )
    assert fit, out
    assert same_range(weights, [f[0] for f in fit]), (weights, fit)
    assert same_range(pool, [f[1] for f in fit]), (pool, fit)
    if total_device != "—":
        total, device = total_device.split(" / ")
        unit = device.split()[-1]
        assert same_range(f"{total} {unit}", [f[2] for f in fit]), (total_device, fit)
        assert same_range(device, [f[3] for f in fit]), (total_device, fit)
    capacity = re.search(r"at 1K / 32K / 256K tokens: (.*)$", out, re.M)[1]
    assert sequences.replace("–", "-").split(" (")[0] == capacity.split(" (")[0]


def test_the_cli_table_names_every_option_of_every_command():
    parsers = build_parser()._subparsers._group_actions[0].choices
    named: dict[str, set[str]] = {}
    for cmd, flags in table_rows():
        named.setdefault(cmd, set()).update(flags)
    for cmd, parser in parsers.items():
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        missing = options - {"--help"} - named.get(cmd, set())
        assert not missing, f"README's `{cmd}` rows omit {sorted(missing)}"


def test_every_dev_sh_command_is_in_the_readme():
    script = (ROOT / "scripts" / "dev.sh").read_text()
    commands = re.search(r'case "\$cmd" in ([\w|]+)\)', script)[1].split("|")
    assert commands and all(f"scripts/dev.sh {c}" in README for c in commands)


def test_no_program_output_noise_in_the_readme():
    assert not re.search(r"\d+%\|", README), "a progress bar was pasted into README.md"
