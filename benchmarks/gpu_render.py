"""The GPU check's results as one markdown table; a section that failed shows its error."""

from __future__ import annotations


def failed(x) -> str | None:
    if isinstance(x, dict) and "error" in x:
        return f"ERROR: {x['error']}"
    if isinstance(x, dict) and "skipped" in x:
        return f"skipped: {x['skipped']}"
    return None


def cell(x, fmt) -> str:
    """fmt(x), or what went wrong with x (a failed section, or a formatting surprise)."""
    if (why := failed(x)) is not None:
        return why
    try:
        return fmt(x)
    except Exception as e:  # a result missing a field must not hide the others
        return f"ERROR rendering: {type(e).__name__}: {e}"


def of_copy(gbps: float, copy) -> str:
    return f" ({gbps / copy:.0%} of copy bandwidth)" if isinstance(copy, float) else ""


def render(r: dict) -> str:
    on, copy = r.get("device_kind", "CUDA"), r.get("copy_gbps")
    rows = [
        f"GPU check on {r['device']} (torch {r['torch']}; Triton kernels: "
        f"{'yes' if r.get('triton_kernels') else 'no'}; "
        + ", ".join(f"{p}: {'yes' if v else 'not installed'}" for p, v in r["packages"].items())
        + f"), {r['wall_s']:.0f} s",
        "",
        "| check | result |",
        "|---|---|",
    ]

    def add(check: str, x, fmt) -> None:
        rows.append(f"| {check} | {cell(x, fmt)} |")

    add(
        f"parity vs HF on {on}, fp32 (tiny, 2 stages, 12 greedy steps)",
        r.get("parity_fp32"),
        lambda p: (
            f"tokens exact {p['prompts_token_exact']}, max logit diff {p['max_logit_diff']:.2e}"
        ),
    )
    add(
        f"parity vs HF on {on}, bf16",
        r.get("parity_bf16"),
        lambda p: (
            f"tokens exact {p['prompts_token_exact']}, max logit diff "
            f"{p['max_logit_diff']:.2e}; distance to fp32: ours {p['ours_vs_fp32']:.2e}, "
            f"HF bf16 {p['hf_vs_fp32']:.2e}"
        ),
    )
    add(
        "decode_graphs vs eager, bf16 (tiny, 3 prompts x 12 teacher-forced steps)",
        r.get("graph_parity"),
        lambda g: (
            f"max logit diff {g['max_logit_diff']:.2e}, argmax agree {g['argmax_agree']}; "
            f"graph steps {g['decode_graph_steps']}, captured {g['decode_graphs_captured']}, off: "
            f"{g['decode_graphs_disabled']}"
        ),
    )
    add(
        "sampler on device logits (as on the last stage), vocab 65536",
        r.get("sampler"),
        lambda s: (
            f"greedy + penalties equal to CPU: {s['greedy_equal']} (logprob diff "
            f"{s['logprob_diff']:.1e}), seeded draws reproducible: {s['seeded_reproducible']}"
        ),
    )
    add(
        "int8 vs bf16 (tiny, 31-token prompt)",
        r.get("int8_quality"),
        lambda q: (
            f"max logit delta {q['tiny_max_logit_delta']:.3f}, loglik "
            f"{q['tiny_loglik_bf16']:.3f} vs {q['tiny_loglik_int8']:.3f}"
        ),
    )
    rows += choice_rows(r.get("kernel_choice"))
    add("kernel fallbacks after every section", r.get("kernel_fallbacks"), str)
    add("device copy bandwidth (read+write)", copy, lambda c: f"{c:.0f} GB/s")
    rows += kernel_rows(r.get("kernels"), copy)
    rows += stage_rows(r, copy)
    hop = r.get("hop")
    if failed(hop) or not isinstance(hop, dict):
        add("hop of hidden states", hop, str)
    else:
        for n, x in hop.items():
            add(
                f"hop of [{n}, 4096] bf16 hidden states",
                x,
                lambda x: (
                    f"via host (object-store path) {x['host_ms']:.3f} ms, on device "
                    f"{x['device_ms']:.3f} ms"
                ),
            )
    return "\n".join(rows)


def choice_rows(k) -> list[str]:
    """Per op: each candidate's self-check (or why it is absent), what runs, times side by side."""
    if failed(k) or not isinstance(k, dict):
        return [f"| kernel choice | {failed(k) or k} |"]
    note = " (interpreter: not a measurement)" if k.get("interpreted") else ""
    rows = []
    for label, x in k.items():
        if label in ("packages", "interpreted", "shapes", "kernel_fallbacks"):
            continue

        def fmt(x):
            cands = "; ".join(f"{n}: {v}" for n, v in x.items() if n not in ("runs", "ms"))
            times = ", ".join(
                f"{n} {cell(t, lambda t: f'{t:.3f} ms')}" for n, t in x.get("ms", {}).items()
            )
            return f"runs **{x['runs']}**; {cands}" + (f"; time: {times}{note}" if times else "")

        rows.append(f"| kernel choice: {label} | {cell(x, fmt)} |")
    return rows


def kernel_rows(k, copy) -> list[str]:
    if failed(k) or not isinstance(k, dict):
        return [f"| Triton kernels | {failed(k) or k} |"]
    note = " (interpreter: not a measurement)" if k.get("interpreted") else ""
    rows = []

    def sect(name: str, label: str, fmt, triton: bool = True) -> None:
        x, why = k.get(name), note if triton else ""
        if failed(x) or not isinstance(x, dict):
            rows.append(f"| kernel {label}{why} | {failed(x) or x} |")
            return
        for case, v in x.items():
            rows.append(f"| kernel {label}, {case}{why} | {cell(v, fmt)} |")

    def speed(v) -> str:
        return f"{v['ms']:.3f} ms, {v['gbps']:.0f} GB/s{of_copy(v['gbps'], copy)}"

    sect(
        "paged_attention",
        "paged decode attention (bf16)",
        lambda v: (
            f"{speed(v)}; {v['rows']} rows, {v['keys']} keys; torch padded gather + SDPA "
            f"{v['torch_padded_ms']:.3f} ms"
        ),
    )
    sect("conv_update", "conv decode update", lambda v: f"{speed(v)}; torch {v['torch_ms']:.3f} ms")
    sect("ssm_update", "SSM decode update", lambda v: f"{speed(v)}; torch {v['torch_ms']:.3f} ms")
    sect(
        "varlen_scan",
        "varlen scan (segments x tokens)",
        lambda v: f"{speed(v)}; torch chunked scan {v['torch_chunked_ms']:.3f} ms",
    )
    sect(
        "moe",
        "MoE experts (bf16, tokens)",
        lambda v: (
            f"{v['experts_hit']} experts hit; grouped (ours) {cell(v['jamba_ray'], speed)}; "
            f"transformers eager {cell(v['eager'], speed)}; transformers grouped_mm "
            f"{cell(v['grouped_mm'], speed)}"
        ),
        triton=False,
    )
    return rows


def stage_rows(r: dict, copy) -> list[str]:
    if "jamba_stage" in r:
        return [f"| Jamba-v0.1 stage | {failed(r['jamba_stage'])} |"]
    rows = [
        "| Jamba-v0.1 stage (layers 0-7: 1 attn, 3 Mamba/MLP, 4 Mamba/MoE) weights | bf16 "
        f"{r.get('stage_gib_bf16', 0):.2f} GiB, int8 {r.get('stage_gib_int8', 0):.2f} GiB |"
    ]

    def step(x) -> str:
        return f"{x['step_ms']:.2f} ms, {x['tok_s']:.0f} tok/s"

    def eager(x) -> str:
        return f"{step(x)}, {x['gbps']:.0f} GB/s achieved{of_copy(x['gbps'], copy)}"

    hf = r.get("transformers_stage")
    hf_decode = hf.get("decode_bf16", {}) if isinstance(hf, dict) else {}
    for kind in ("bf16", "int8"):
        dec = r.get(f"decode_{kind}")
        if failed(dec) or not isinstance(dec, dict):
            rows.append(f"| decode step, {kind} | {failed(dec) or dec} |")
            continue
        for b, variants in dec.items():
            parts = [cell(variants.get("eager"), eager)]
            for name, label in (("kernels_off", "torch paths"), ("moe_grouped", "MoE grouped")):
                if name in variants:
                    parts.append(f"{label}: {cell(variants[name], step)}")
            rows.append(f"| decode step, {kind}, batch {b} | {'; '.join(parts)} |")
            if kind == "bf16" and b in hf_decode:
                rows.append(
                    f"| transformers decode step, bf16, batch {b} | {cell(hf_decode[b], step)} |"
                )
        if kind == "bf16":
            rows += graph_rows(r.get("decode_graphs_bf16"), dec)
    for kind in ("bf16", "int8"):
        pre = r.get(f"prefill_{kind}")
        if failed(pre) or not isinstance(pre, dict):
            rows.append(f"| prefill, {kind} | {failed(pre) or pre} |")
            continue
        for n, x in pre.items():
            rows.append(f"| prefill of {n} tokens, {kind} | {cell(x, prefill)} |")
    if isinstance(hf, dict) and not failed(hf):
        rows.append(
            f"| transformers (experts: {hf.get('experts_implementation')}, attention: "
            f"{hf.get('attn_implementation')}) | same 8 layers, random bf16 weights |"
        )
        for n, x in hf.get("prefill_bf16", {}).items():
            rows.append(f"| transformers prefill of {n} tokens, bf16 | {cell(x, prefill)} |")
    else:
        rows.append(f"| transformers stage | {failed(hf) or hf} |")
    return rows


def prefill(x) -> str:
    peak = f", peak {x['peak_gib']:.1f} GiB" if x.get("peak_gib") is not None else ""
    return f"{x['ms']:.1f} ms, {x['tok_s']:.0f} tok/s{peak}"


def graph_rows(g, dec) -> list[str]:
    if failed(g) or not isinstance(g, dict):
        return [f"| decode graphs | {failed(g) or g} |"]
    rows = []
    for b, x in g.items():
        if b == "stats":
            continue
        base = dec.get(b, {}).get("eager", {})
        ratio = f" ({base['step_ms'] / x['step_ms']:.2f}x eager)" if "step_ms" in base else ""
        rows.append(
            f"| decode step, bf16, batch {b}, decode_graphs | {x['step_ms']:.2f} ms{ratio}, "
            f"{x['tok_s']:.0f} tok/s, max diff vs eager {x['max_diff_vs_eager']:.2e} |"
        )
    rows.append(f"| decode graphs | {g.get('stats')} |")
    return rows
