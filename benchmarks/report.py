"""Markdown tables of the latest benchmark results (for benchmarks/README.md).

python benchmarks/report.py --quick      # results/*_quick.json
python benchmarks/report.py              # results/*.json (full mode)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results"


def ms(entry) -> str:
    return f"{entry['median_s'] * 1e3:.0f}" if entry else "—"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(payload: dict) -> str:
    m = payload["machine"]
    load = m.get("load_average")
    load = f", load average {load[0]:.1f}" if load else ""
    return (
        f"*{payload['benchmark']} ({payload['mode']}): {m['backend']} — {m['cpu']}, "
        f"{m['cpu_cores']} cores{load}; jax {m['versions']['jax']}, "
        f"commit {m.get('git_commit')}, {m['date']}*"
    )


def scaling(payload: dict) -> str:
    out = [machine_line(payload)]
    for name, section in payload["problems"].items():
        problem = section["problem"]
        grid = " × ".join(str(v) for v in problem["grid"].values())
        points = [r for r in section["results"] if r["sweep"] == "points"]
        experts = sorted({r["experts"] for r in points})
        seeds = sorted({r.get("seed", 0) for r in points})
        header = ["basis"] * (len(seeds) > 1) + ["points"]
        header += [f"K={k} fwd / fwd+bwd (ms)" for k in experts]
        header += [f"HC/MoE K={k} fwd, fwd+bwd" for k in experts if k > 1]
        rows = []
        for seed, total in sorted({(r.get("seed", 0), r["points_total"]) for r in points}):
            by_k = {
                r["experts"]: r
                for r in points
                if r["points_total"] == total and r.get("seed", 0) == seed
            }
            row = [seed] * (len(seeds) > 1) + [f"{total:g}"]
            for k in experts:
                r = by_k.get(k, {})
                row.append(
                    f"{ms(r.get('forward'))} / {ms(r.get('gradient'))}"
                    if "forward" in r
                    else r.get("skipped", "—")
                )
            for k in experts:
                if k > 1:
                    r = by_k.get(k, {})
                    row.append(
                        f"{r['forward_speedup_vs_hc']:.2f}×, {r['gradient_speedup_vs_hc']:.2f}×"
                        if "forward_speedup_vs_hc" in r
                        else "—"
                    )
            rows.append(row)
        out.append(
            f"\n**{name}** ({grid}, N = {problem['n_basis']}), total constrained points "
            "split evenly over K experts:\n"
        )
        out.append(table(header, rows))
        sweep = sorted(
            (r for r in section["results"] if r["sweep"] == "experts"), key=lambda r: r["experts"]
        )
        if sweep:
            out.append(f"\nExperts at {sweep[0]['points_per_expert']} points per expert:\n")
            out.append(
                table(
                    [
                        "K",
                        "fwd (ms)",
                        "fwd+bwd (ms)",
                        "compile fwd + bwd (s)",
                        "LM steps mean/max",
                        "converged",
                    ],
                    [
                        [
                            r["experts"],
                            ms(r.get("forward")),
                            ms(r.get("gradient")),
                            f"{r['compile_forward']['compile_s']:.1f} + "
                            f"{r['compile_gradient']['compile_s']:.1f}",
                            f"{r['lm_steps_mean']:.1f} / {r['lm_steps_max']}",
                            f"{r['converged_fraction']:.0%}",
                        ]
                        for r in sweep
                    ],
                )
            )
        out.append("\nCompile time and LM steps (points sweep):\n")
        out.append(
            table(
                [
                    "points",
                    "K",
                    "compile fwd (s)",
                    "compile fwd+bwd (s)",
                    "LM steps mean/max",
                    "converged",
                ],
                [
                    [
                        f"{r['points_total']:g}",
                        r["experts"],
                        f"{r['compile_forward']['compile_s']:.1f}",
                        f"{r['compile_gradient']['compile_s']:.1f}",
                        f"{r['lm_steps_mean']:.1f} / {r['lm_steps_max']}",
                        f"{r['converged_fraction']:.0%}",
                    ]
                    for r in points
                    if "compile_forward" in r
                ],
            )
        )
    return "\n".join(out)


def memory(payload: dict) -> str:
    out = [machine_line(payload)]
    for name in ("diffusion_sorption", "navier_stokes"):
        if name not in payload:
            continue
        results = payload[name]["results"]
        names = [
            k
            for k in ("hcmoe", "implicit", "unrolled", "unrolled_all")
            if all(k in r["adjoints"] for r in results)
        ]
        rows = []
        for r in results:
            a = r["adjoints"]
            reference = r.get("gradient_reference", "implicit")
            rows.append(
                [f"{r['points_total']:g}", r["experts"]]
                + [f"{a[k]['memory'].get('peak_bytes', 0) / 2**20:.1f}" for k in names]
                + [f"{a[k]['gradient']['median_s'] * 1e3:.1f}" for k in names]
                + [
                    f"{a[k].get('gradient_relative_difference_vs_reference', a[k].get('gradient_relative_difference_vs_implicit', float('nan'))):.1e}"  # noqa: E501
                    for k in names
                    if k != reference
                ]
            )
        reference = results[0].get("gradient_reference", "implicit") if results else "implicit"
        out.append(
            f"\n**{name}** (peak MiB of one gradient, XLA buffer assignment; gradient "
            f"time, ms; relative difference of the gradient vs {reference}):\n"
        )
        out.append(
            table(
                ["points", "K"]
                + [f"{k} MiB" for k in names]
                + [f"{k} ms" for k in names]
                + [f"{k} vs {reference}" for k in names if k != reference],
                rows,
            )
        )
    return "\n".join(out)


def backbone(payload: dict) -> str:
    out = [machine_line(payload)]
    rows = []
    for r in payload["results"]:
        c, t = r["config"], r["timing"]
        for k in c["experts"]:
            e = r["experts"][str(k)] if str(k) in r["experts"] else r["experts"][k]
            rows.append(
                [
                    r["problem"]["name"],
                    c["fno"],
                    c["batch"],
                    c["points"],
                    k,
                    ms(t["backbone_step"]),
                    ms(t[f"{k}/full_step"]),
                    ms(t[f"{k}/constraint_gradient"]),
                    f"{e['constraint_over_backbone']:.2f}",
                    f"{e['constraint_share_of_step']:.0%}",
                ]
            )
    out.append("")
    out.append(
        table(
            [
                "problem",
                "backbone",
                "batch",
                "points/expert",
                "K",
                "backbone step (ms)",
                "full step (ms)",
                "constraint fwd+bwd (ms)",
                "constraint / backbone",
                "constraint share",
            ],
            rows,
        )
    )
    return "\n".join(out)


def solvers(payload: dict) -> str:
    out = [machine_line(payload)]
    for name in ("diffusion_sorption", "navier_stokes", "heat"):
        if name not in payload:
            continue
        results = payload[name]["results"]
        variants = list(results[0]["variants"])
        reference = variants[0]
        rows = []
        for r in results:
            row = [f"{r['points_total']:g}", r["experts"]]
            for v in variants:
                e = r["variants"][v]
                row.append(f"{ms(e['forward'])} / {ms(e['gradient'])}")
            for v in variants[1:]:
                e = r["variants"][v]
                row.append(
                    f"{e[f'forward_speedup_vs_{reference}']:.1f}×, "
                    f"{e[f'gradient_speedup_vs_{reference}']:.1f}×"
                )
            row.append(
                " / ".join(
                    str(
                        round(
                            sum(r["variants"][v]["lm_steps"]) / len(r["variants"][v]["lm_steps"]), 1
                        )
                    )
                    for v in variants
                )
            )
            rows.append(row)
        header = (
            ["points", "K"]
            + [f"{v} fwd / fwd+bwd (ms)" for v in variants]
            + [f"{v} speed-up vs {reference}" for v in variants[1:]]
            + ["LM steps (mean, " + " / ".join(variants) + ")"]
        )
        out.append(f"\n**{name}**:\n")
        out.append(table(header, rows))
    rows = [
        [
            f"{r['points_total']:g}",
            r["experts"],
            f"{r['max_abs_weight_difference']:.1e}",
            f"{r['max_abs_weight']:.1e}",
            f"{r['max_abs_u_difference']:.1e}",
            " ".join(f"{x:.9f}" for x in r["residual_norm"]["optx_qr"]),
            " ".join(f"{x:.9f}" for x in r["residual_norm"]["hcmoe"]),
        ]
        for r in payload.get("accuracy_diffusion_sorption", [])
    ]
    if rows:
        out.append("\n**accuracy** (diffusion–sorption, rtol = atol = 1e-10, ≤ 200 steps):\n")
        out.append(
            table(
                [
                    "points",
                    "K",
                    "max abs Δw",
                    "max abs w",
                    "max abs Δu",
                    "residual norms, QR",
                    "residual norms, hcmoe",
                ],
                rows,
            )
        )
    return "\n".join(out)


def peer(payload: dict) -> str:
    """hcmoe's variants against the paper's release at the same rows: ms and ratios."""
    out = [machine_line(payload)]
    c = payload.get("config", {})
    if c:
        grid = " × ".join(str(v) for v in c["grid"].values())
        out.append(
            f"\n{grid}, N = {c['n_basis']}, {c['points_per_expert']} points per expert, "
            f"{c['rounds']} rounds (medians), {c['dtype']}, hcmoe's termination "
            f"{c.get('termination', 'cauchy')}\n"
        )
    rows = []
    for r in payload["results"]:
        for name, e in r["impls"].items():
            ratio = r.get("ratio_over_release", {}).get(name)
            rows.append(
                [
                    r["experts"],
                    name,
                    *(f"{e[key]:.0f}" for key in ("forward_ms", "fwd_grad_ms", "setup_ms")),
                    f"{e['backward_ms']:.0f}" if e["backward_ms"] > 0 else "—",
                    f"{e['backward_vjp_ms']:.0f}" if "backward_vjp_ms" in e else "—",
                    f"{e['per_lm_step_ms']:.1f}",
                    f"{e['peak_bytes']['fwd+grad'] / 2**20:.0f}",
                    "/".join(str(n) for n in e["lm_steps"]),
                    "—" if ratio is None else f"{ratio['forward']:.2f}× / {ratio['fwd_grad']:.2f}×",
                ]
            )
    out.append(
        table(
            [
                "K",
                "impl",
                "forward (ms)",
                "fwd+grad (ms)",
                "setup (ms)",
                "backward (ms)",
                "backward, VJP alone (ms)",
                "per LM step (ms)",
                "fwd+grad peak (MiB)",
                "LM steps",
                "forward / fwd+grad vs release",
            ],
            rows,
        )
    )
    out.append(
        "\n(backward = fwd+grad − forward, — where that difference is not positive; "
        "backward, VJP alone = applying the stored VJP, timed on its own; — in runs "
        "before it was measured.)"
    )
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    suffix = "_quick" if args.quick else ""
    for base, render in (
        ("solvers", solvers),
        ("scaling", scaling),
        ("memory", memory),
        ("backbone_share", backbone),
        ("peer", peer),
    ):
        for name in (base, f"{base}_ds", f"{base}_ns"):
            path = args.results / f"{name}{suffix}.json"
            if path.exists():
                print(f"### {name}\n")
                print(render(json.loads(path.read_text())))
                print()


if __name__ == "__main__":
    main()
