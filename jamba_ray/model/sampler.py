"""Logits -> next tokens (+ logprobs), one row per sequence, each row with its own parameters.

Seeded rows draw from a generator keyed by (seed, sample index, step), so a row's tokens depend
only on its own request, never on what else shares the batch. It runs where the logits are: on the
last stage's device; a seed gives the same tokens on the same kind of device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine.messages import SampledToken
from ..engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RowInput:
    params: SamplingParams
    seed: int  # the request's seed (drawn at random when the caller gave none)
    index: int  # which of the n samples this row is
    prompt_ids: list[int]  # read by the repetition penalty only
    output_ids: list[int]  # read by the penalties only
    num_output: int | None = None  # tokens generated so far, when output_ids is left out

    @property
    def generated(self) -> int:
        return len(self.output_ids) if self.num_output is None else self.num_output


def sample(
    logits: torch.Tensor,
    rows: list[RowInput],
    eos_id: int | None,
    constrain: Callable[[torch.Tensor], None] | None = None,
) -> list[SampledToken]:
    """logits [R, V] fp32 -> one sampled token per row. `constrain` masks the rows that follow a
    grammar (in place, after the penalties); reported logprobs stay the model's own."""
    raw_logprobs = torch.log_softmax(logits, dim=-1)  # [R, V] reported logprobs are the model's
    logits = _apply_penalties(logits.clone(), rows)
    _mask_eos(logits, rows, eos_id)
    if constrain is not None:
        constrain(logits)
    tokens = logits.argmax(dim=-1)  # [R]
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        tokens[drawn] = _draw(logits[drawn], [rows[i] for i in drawn])
    # One copy to the host for the whole batch: on a GPU every per-row read would be a sync.
    chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]
    k = max((row.params.logprobs or 0) for row in rows)
    top = raw_logprobs.topk(k) if k else None
    tokens, chosen = tokens.tolist(), chosen.tolist()
    top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    out = []
    for i, row in enumerate(rows):
        want = row.params.logprobs
        best = None if want is None else dict(zip(top_i[i][:want], top_v[i][:want])) if want else {}
        out.append(SampledToken(tokens[i], chosen[i], best))
    return out


def top_logprobs(logprobs: torch.Tensor, k: int | None) -> dict[int, float] | None:
    if not k:
        return None if k is None else {}
    values, ids = logprobs.topk(k)
    return dict(zip(ids.tolist(), values.tolist()))


def _apply_penalties(logits: torch.Tensor, rows: list[RowInput]) -> torch.Tensor:
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        ids = torch.tensor(row.output_ids, dtype=torch.long, device=logits.device)
        out_counts = torch.bincount(ids, minlength=vocab)[:vocab].to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = out_counts > 0
            if row.prompt_ids:
                seen[torch.tensor(row.prompt_ids, dtype=torch.long, device=logits.device)] = True
            l = logits[i]
            penalised = torch.where(l > 0, l / p.repetition_penalty, l * p.repetition_penalty)
            logits[i] = torch.where(seen, penalised, l)
        logits[i] -= p.frequency_penalty * out_counts + p.presence_penalty * (out_counts > 0)
    return logits


def _mask_eos(logits: torch.Tensor, rows: list[RowInput], eos_id: int | None) -> None:
    """Below min_tokens, EOS and stop tokens cannot be sampled."""
    for i, row in enumerate(rows):
        if row.generated < row.params.min_tokens:
            banned = list(row.params.stop_token_ids) + ([eos_id] if eos_id is not None else [])
            logits[i, banned] = float("-inf")


def _draw(logits: torch.Tensor, rows: list[RowInput]) -> torch.Tensor:
    """Temperature, top-k, min-p and top-p filtering, then one draw per row: batched over the rows
    (per-row loops cost a sort and a dozen small ops each), except each row's own seeded uniform."""

    def per_row(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=logits.device)[:, None]

    vocab = logits.shape[-1]
    probs = torch.softmax(logits / per_row([r.params.temperature for r in rows]), dim=-1)  # [D, V]
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    if min(top_k) < vocab:
        kth = probs.sort(dim=-1, descending=True).values.gather(1, per_row(top_k, torch.long) - 1)
        probs = torch.where(probs < kth, 0.0, probs)
    if any(r.params.min_p > 0 for r in rows):
        probs = torch.where(
            probs < per_row([r.params.min_p for r in rows]) * probs.amax(-1, keepdim=True),
            0.0,
            probs,
        )
    if any(r.params.top_p < 1 for r in rows):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        top_p = per_row([r.params.top_p if r.params.top_p < 1 else float("inf") for r in rows])
        drop = cum - sorted_p >= top_p * cum[:, -1:]  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(1, order, torch.where(drop, 0.0, sorted_p))
    # Inverse CDF: the first token whose cumulative probability passes the row's own uniform.
    u = torch.cat(
        [torch.rand(1, device=logits.device, generator=_generator(r, logits.device)) for r in rows]
    )
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)


def _generator(row: RowInput, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_row_seed(row))


def _row_seed(row: RowInput) -> int:
    step = row.generated
    return (row.seed * 1_000_003 + row.index * 10_007 + step) % (2**63 - 1)
