"""The last stage's side of the contract: turn logits into a `StepResult`.

The last stage keeps what sampling needs of each running sequence (parameters, seed, prompt and
the tokens it drew), registered once when the sequence is admitted, so a step message names only
which sequences sample from which row. Logits never leave the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.messages import SeqInfo, StepMessage, StepResult
from ..model.grammar import Constraints
from ..model.sampler import RowInput, sample, top_logprobs


@dataclass(slots=True)
class _Row:
    info: SeqInfo
    output_ids: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)  # one list, made at registration

    def input(self) -> RowInput:
        i = self.info
        return RowInput(i.params, i.seed, i.index, self.prompt_ids, self.output_ids)


class SamplingTable:
    def __init__(self, eos_id: int | None, tokenizer_path: str | None = None):
        """`tokenizer_path`: the vocabulary grammars compile against (else each spec names it)."""
        self.eos_id = eos_id
        self.rows: dict[int, _Row] = {}
        self.grammars = Constraints(eos_id, tokenizer_path)

    def update(self, msg: StepMessage) -> None:
        for sid in msg.finished:
            self.rows.pop(sid, None)
            self.grammars.forget(sid)
        for info in msg.admitted:  # (again, after a replay: the driver's tokens are the truth)
            self.rows[info.seq_id] = _Row(info, list(info.output_ids), list(info.prompt_ids))
            spec = getattr(info.params, "structured", None)
            if spec is not None:
                self.grammars.admit(info.seq_id, spec, info.output_ids)

    def result(
        self, msg: StepMessage, logits: torch.Tensor, scores: torch.Tensor | None
    ) -> StepResult:
        """logits [R, V] fp32 for msg.logit_rows(); scores [C, K] for msg.score_rows()."""
        res = StepResult(msg.step_id, logits=logits.cpu().numpy() if msg.return_logits else None)
        draws: list[tuple[int, int]] = []  # (logit row, seq id)
        row = score_row = 0
        for seg in msg.segments:
            rows = range(row, row + seg.num_logit_rows)
            row = rows.stop
            if seg.logits == "all":
                self._prompt_logprobs(res, seg.seq_id, seg.start, logits[rows.start : rows.stop])
            if seg.logits == "score":
                res.scores[seg.seq_id] = scores[score_row].tolist()
                score_row += 1
            draws += [(rows[-1], sid) for sid in seg.samples]
        if draws:
            sids = [s for _, s in draws]
            constrain = self.grammars.constrain(sids, logits.shape[-1])
            rows = [self.rows[s].input() for s in sids]
            outs = sample(logits[[r for r, _ in draws]], rows, self.eos_id, constrain)
            for sid, out in zip(sids, outs):
                self.rows[sid].output_ids.append(out.token)
                self.grammars.accept(sid, out.token)
                res.samples[sid] = out
        return res

    def _prompt_logprobs(self, res: StepResult, sid: int, start: int, logits: torch.Tensor) -> None:
        """Entries for prompt positions start+1 .. (row j's logits predict position start+j+1)."""
        row = self.rows.get(sid)  # (unregistered: a raw-logits request, or the probe)
        if row is None or row.info.params.prompt_logprobs is None:
            return
        k, prompt = row.info.params.prompt_logprobs, row.info.prompt_ids
        targets = range(start + 1, min(start + 1 + logits.shape[0], len(prompt)))
        if not len(targets):
            return
        lp = torch.log_softmax(logits[: len(targets)], dim=-1)  # [n, V]
        ids = torch.tensor([prompt[t] for t in targets])
        chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
        entries = [
            {prompt[t]: c, **(top_logprobs(lp[j], k) or {})}
            for j, (t, c) in enumerate(zip(targets, chosen))
        ]
        res.prompt_logprobs[sid] = (targets.start, entries)
