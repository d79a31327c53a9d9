"""/metrics of an app: one model's text (every engine replica's, merged by
`EngineHandle.metrics` under a `replica` label), or several models' merged under a `model` label
(the text format wants each family's samples together, under one HELP and TYPE)."""

from __future__ import annotations

import asyncio

PROMETHEUS = "text/plain; version=0.0.4"


async def all_metrics(models: dict) -> str:
    """`models`: served name -> OpenAIServing (its `engine` renders the text)."""
    if len(models) == 1:
        return await next(iter(models.values())).engine.metrics()
    texts = await asyncio.gather(
        *(s.engine.metrics(f'model="{_escape(n)}"') for n, s in models.items())
    )
    return merge_families(texts)


def merge_families(texts: list[str]) -> str:
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    family = ""
    for text in texts:
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split()[2]
                lines = headers.setdefault(family, [])
                if line not in lines:
                    lines.append(line)
            elif line:
                samples.setdefault(family, []).append(line)
    out = [ln for f in headers for ln in headers[f] + samples.get(f, [])]
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
