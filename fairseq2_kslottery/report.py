"""``report.md`` (and PNG plots) from a finished — or partly finished — experiment directory.

Every number comes from the files the stages wrote (``scores.json``, ``run_info.json``, ``stage.json``,
``tickets.json``, ``ks_stats.safetensors``, ``metrics/train.jsonl``); nothing is typed by hand. Missing stages show
as "not run" and skipped ones with their reason, so the report can be rebuilt at any time
(``fairseq2-kslottery report DIR``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fairseq2_kslottery.io import atomic_write_text

__all__ = ["build_report", "SystemRow", "collect_rows"]


@dataclass
class SystemRow:
    system: str
    kind: str
    """``base``, ``reference``, ``tickets``, ``transfer`` or ``baseline <name>``."""
    k: int | None
    scores: dict[str, Any] | None
    run_info: dict[str, Any] | None
    wall_seconds: float | None
    status: str


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _status(stage_dir: Path) -> tuple[str, float | None]:
    marker = _json(stage_dir / "stage.json")
    if marker is None:
        return "not run", None
    if marker.get("status") == "skipped":
        return f"skipped: {marker.get('reason')}", None
    return "done", float(marker.get("wall_seconds", 0.0))


def _rule_labels(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    from fairseq2_kslottery.pipeline.config import RuleConfig

    out = []
    for rule in (config.get("selection") or {}).get("rules", []):
        out.append((RuleConfig(**rule).label(), rule))
    return out


def collect_rows(root: Path, config: dict[str, Any], direction: str) -> list[SystemRow]:
    """The results table of one direction, from the stage folders."""
    base = root / direction
    rows: list[SystemRow] = []

    def add(system: str, kind: str, eval_dir: str, train_dir: str | None, k: int | None) -> None:
        status, _ = _status(base / eval_dir)
        train_status, wall = _status(base / train_dir) if train_dir else ("done", None)
        if train_status.startswith("skipped"):
            status = train_status
        scores = _json(base / eval_dir / "scores.json") if status == "done" else None
        info = _json(base / train_dir / "run_info.json") if train_dir else None
        rows.append(SystemRow(system, kind, k, scores, info, wall, status))

    if config.get("evaluate_base", True):
        add("base (untuned)", "base", "eval_base", None, 0)
    add(f"reference tuning ({config.get('reference_mode', 'embed')})", "reference", "eval_reference", "reference", None)
    for label, _ in _rule_labels(config):
        tickets = _json(base / f"select_{label}" / "tickets.json")
        k = len(tickets["token_ids"]) if tickets else None
        add(f"KS tickets {label}", "tickets", f"eval_tickets_{label}", f"tickets_{label}", k)
        for baseline in config.get("baselines", []):
            used = _json(base / f"baseline_{baseline}_{label}" / "tickets_used.json")
            add(
                f"baseline {baseline} ({label})",
                f"baseline {baseline}",
                f"eval_baseline_{baseline}_{label}",
                f"baseline_{baseline}_{label}",
                len(used["token_ids"]) if used else None,
            )
        if config.get("transfer", True):
            add(f"partial transfer {label}", "transfer", f"eval_transfer_{label}", None, k)
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _bytes(n: Any) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(rows: list[SystemRow]) -> list[str]:
    lines = [
        "| system | k | BLEU | chrF | first-line BLEU | EOS rate | length ratio | trainable params | optimizer state "
        "| train wall time | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        s = r.scores or {}
        info = r.run_info or {}
        wall = f"{r.wall_seconds:.0f} s" if r.wall_seconds is not None else "–"
        lines.append(
            f"| {r.system} | {_fmt(r.k)} | {_fmt(s.get('bleu'))} | {_fmt(s.get('chrf'))} | "
            f"{_fmt(s.get('first_line_bleu'))} | {_fmt(s.get('eos_rate'), 3)} | {_fmt(s.get('length_ratio'), 3)} | "
            f"{_fmt(info.get('trainable_parameters'))} | {_bytes(info.get('optimizer_state_bytes'))} | {wall} | "
            f"{r.status} |"
        )
    return lines


def _tickets_section(tickets: dict[str, Any], limit: int = 30) -> list[str]:
    lines = ["| # | id | token | D | p |", "| ---: | ---: | --- | ---: | ---: |"]
    tokens = tickets.get("tokens") or [None] * len(tickets["token_ids"])
    for i, (tid, tok, d, p) in enumerate(
        zip(tickets["token_ids"], tokens, tickets["statistics"], tickets["pvalues"], strict=False), start=1
    ):
        if i > limit:
            lines.append(f"| … | | {len(tickets['token_ids']) - limit} more in tickets.json | | |")
            break
        shown = "–" if tok is None else "`" + repr(tok)[1:-1].replace("|", "\\|").replace("`", "'") + "`"
        lines.append(f"| {i} | {tid} | {shown} | {_fmt(d, 4)} | {'–' if p is None else f'{p:.3g}'} |")
    return lines


def _samples(root: Path, direction: str, config: dict[str, Any], count: int = 3) -> list[str]:
    split = (config.get("evaluation") or {}).get("split", "test")
    first_label = next((label for label, _ in _rule_labels(config)), None)
    systems = [("base", "eval_base"), ("reference tuning", "eval_reference")]
    if first_label:
        systems += [
            (f"tickets {first_label}", f"eval_tickets_{first_label}"),
            (f"newline ({first_label})", f"eval_baseline_newline_{first_label}"),
        ]
    loaded = {}
    for label, folder in systems:
        path = root / direction / folder / "hypotheses" / f"{split}_step_0.jsonl"
        if path.is_file():
            loaded[label] = [json.loads(line) for line in path.open(encoding="utf-8")][:count]
    if not loaded:
        return ["(no evaluation finished yet)"]
    lines: list[str] = []
    reference_records = next(iter(loaded.values()))
    for i, record in enumerate(reference_records):
        lines += [f"**Example {i + 1}**", "", f"- source: {record['src']}", f"- reference translation: {record['ref']}"]
        for label, records in loaded.items():
            if i < len(records):
                hyp = records[i]["raw"].replace("\n", " ⏎ ")
                stop = "" if records[i]["eos"] else " (no EOS)"
                lines.append(f"- {label}: {hyp}{stop}")
        lines.append("")
    return lines


def _plots(root: Path, direction: str, config: dict[str, Any], rows: list[SystemRow]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    made: list[str] = []

    for label, _ in _rule_labels(config):
        stats_path = root / direction / f"select_{label}" / "ks_stats.safetensors"
        tickets = _json(root / direction / f"select_{label}" / "tickets.json")
        if not stats_path.is_file() or tickets is None:
            continue
        from safetensors.torch import load_file

        stats = load_file(str(stats_path))["statistic"].sort(descending=True).values.numpy()
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(stats) + 1), stats, lw=1.2, label="KS statistic D (sorted)")
        crit = (tickets.get("certificate") or {}).get("critical_statistic")
        if crit is not None:
            ax.axhline(crit, color="tab:red", ls="--", label=f"critical D = {crit:.4f}")
        k = len(tickets["token_ids"])
        if k:
            ax.axvline(k, color="tab:green", ls=":", label=f"k = {k}")
        ax.set_xscale("log")
        ax.set_xlabel("rank (log scale)")
        ax.set_ylabel("D")
        ax.set_title(f"{direction}: KS statistic by rank ({label})")
        ax.legend()
        name = f"ks_{direction}_{label}.png"
        fig.tight_layout()
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # BLEU against k: tickets, baselines and transfer per rule; base and reference as lines.
    series: dict[str, list[tuple[int, float]]] = {}
    lines: dict[str, float] = {}
    for r in rows:
        if not r.scores:
            continue
        bleu = float(r.scores["bleu"])
        if r.kind in ("base", "reference"):
            lines[r.system] = bleu
        elif r.k is not None:
            series.setdefault(r.kind, []).append((r.k, bleu))
    if series or lines:
        fig, ax = plt.subplots(figsize=(7, 4))
        for kind, points in series.items():
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                ls="-" if len(points) > 1 else "",
                label=kind,
            )
        for (label, value), color in zip(lines.items(), ("tab:gray", "tab:purple"), strict=False):
            ax.axhline(value, ls="--", lw=1, color=color, label=f"{label}: {value:.2f}")
        ax.set_xlabel("trained rows k")
        ax.set_ylabel("BLEU")
        ax.set_title(f"{direction}: BLEU against k")
        ax.legend(fontsize=8)
        name = f"bleu_vs_k_{direction}.png"
        fig.tight_layout()
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)
        made.append(name)

    # Loss curves of the training stages.
    fig, ax = plt.subplots(figsize=(7, 4))
    drew = False
    for run in sorted((root / direction).glob("*/metrics/train.jsonl")):
        points = []
        for line in run.open(encoding="utf-8"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "NLL Loss" in row and "Step" in row:
                points.append((int(row["Step"]), float(row["NLL Loss"])))
        if points:
            points = sorted(dict(points).items())
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1, label=run.parent.parent.name)
            drew = True
    if drew:
        ax.set_xlabel("step")
        ax.set_ylabel("training NLL (target tokens)")
        ax.set_title(f"{direction}: loss curves")
        ax.legend(fontsize=7)
        name = f"loss_{direction}.png"
        fig.tight_layout()
        fig.savefig(plots / name, dpi=110)
        made.append(name)
    plt.close(fig)
    return made


def _overlap(root: Path, config: dict[str, Any]) -> list[str]:
    directions = [d["name"] for d in config.get("directions", [])]
    labels = _rule_labels(config)
    if len(directions) < 2 or not labels:
        return []
    label = labels[0][0]
    sets = {}
    tokens: dict[int, str] = {}
    for d in directions:
        t = _json(root / d / f"select_{label}" / "tickets.json")
        if t:
            sets[d] = set(t["token_ids"])
            for tid, tok in zip(t["token_ids"], t.get("tokens") or [], strict=False):
                tokens[tid] = tok
    lines = [
        f"## Ticket overlap across directions ({label})",
        "",
        "| A | B | shared | Jaccard | shared tokens |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sets[a] & sets[b]
            union = sets[a] | sets[b]
            shown = ", ".join(f"`{repr(tokens.get(t, t))[1:-1]}`" for t in sorted(shared)[:15])
            lines.append(f"| {a} | {b} | {len(shared)} | {len(shared) / max(len(union), 1):.3f} | {shown} |")
    return lines + [""]


def build_report(root: Path) -> Path:
    """Write ``root/report.md`` and ``root/plots/*.png``; returns the report path."""
    from fairseq2_kslottery.certify import format_certificate

    root = Path(root)
    config = yaml.safe_load((root / "experiment.yaml").read_text(encoding="utf-8"))
    model = config.get("model", {})
    out = [
        f"# KS-Lottery experiment: {config.get('name')}",
        "",
        f"Model `{model.get('name') or model.get('path')}`, reference tuning `{config.get('reference_mode')}` "
        f"(tied models: `{config.get('tied')}`), evaluation on the `{(config.get('evaluation') or {}).get('split')}` "
        "split. All numbers below are read from the stage folders of this directory.",
        "",
        "How to read it: BLEU and chrF measure the translation; **first-line BLEU** scores only the first line of "
        "each output and the **EOS rate** is the share of outputs that stopped by themselves — a BLEU gain that "
        "first-line BLEU does not show, with an EOS rate jumping up, is the model learning to stop, not to "
        "translate. The frequency-matched random and newline baselines show how much of a gain any rows of that "
        "kind would give.",
        "",
    ]
    for direction in [d["name"] for d in config.get("directions", [])]:
        rows = collect_rows(root, config, direction)
        out += [f"## Direction {direction}", "", "### Results", ""] + _table(rows) + [""]
        for label, _ in _rule_labels(config):
            tickets = _json(root / direction / f"select_{label}" / "tickets.json")
            if tickets is None:
                continue
            summary = tickets.get("summary") or {}
            sig = summary.get("significant_rows") or {}
            out += [
                f"### Tickets: {label}",
                "",
                f"{len(tickets['token_ids'])} rows of {tickets['vocab_size']} (d = {tickets['embed_dim']}); rows that "
                f"changed at all during reference tuning: {summary.get('rows_changed')}; rows significant at "
                f"alpha = {summary.get('significance_alpha')}: {sig.get('none')} uncorrected, {sig.get('bh')} "
                f"Benjamini–Hochberg, {sig.get('bonferroni')} Bonferroni; largest D = "
                f"{_fmt(summary.get('max_statistic'), 4)}, smallest p = {_fmt(summary.get('min_pvalue'), 4)}.",
                "",
            ]
            out += _tickets_section(tickets) + [""]
            if tickets.get("certificate"):
                out += ["```", format_certificate(tickets["certificate"]), "```", ""]
        out += ["### Sample translations", ""] + _samples(root, direction, config)
        plots = _plots(root, direction, config, rows)
        if plots:
            out += ["### Plots", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    out += _overlap(root, config)
    union_rows = sorted((root / "union").glob("eval_*/scores.json")) if (root / "union").is_dir() else []
    if union_rows:
        out += [
            "## Union tickets trained on the mixed data",
            "",
            "| direction | BLEU | chrF | first-line BLEU | EOS rate |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for path in union_rows:
            s = _json(path) or {}
            out.append(
                f"| {path.parent.name.removeprefix('eval_')} | {_fmt(s.get('bleu'))} | {_fmt(s.get('chrf'))} | "
                f"{_fmt(s.get('first_line_bleu'))} | {_fmt(s.get('eos_rate'), 3)} |"
            )
        out.append("")
    notices = {(_json(p) or {}).get("notice") for p in root.glob("*/eval_*/scores.json")} - {None}
    if notices:
        out += ["## Notes", ""] + [f"- {n}" for n in sorted(notices)] + [""]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(out) + "\n")
    return path
