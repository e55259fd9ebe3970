"""The report of a cleaning job: per-shard stats merged into report.json, report.md and removals.png.

Accounting (checked by `merge`, stated in `accounted`): every record read is kept, dropped with a
reason, or an error, overall and per source:

    documents_in = documents_out + sum(dropped.values()) + errors
    bytes_in     = bytes_out + sum(bytes_dropped.values()) + bytes_errors + bytes_edited

Bytes are UTF-8 bytes of a document's text (plus its HTML before extraction) as read; a dropped
document weighs what it weighed when read; `bytes_edited` is what steps cut from kept documents
(C4 line removal, extraction, normalisation; negative when a step lengthens text, e.g. PII
placeholders). Errors weigh the bytes of the record set aside (0 when unknown, e.g. the lost
tail of a truncated stream).
"""
from __future__ import annotations

import json
import os
from typing import Any

COUNT_KEYS = ("documents_in", "documents_out", "errors", "bytes_in", "bytes_out", "bytes_errors", "bytes_edited")


def _add(into: dict, other: dict) -> None:
    for k in COUNT_KEYS:
        into[k] = into.get(k, 0) + other.get(k, 0)
    for k in ("dropped", "bytes_dropped", "pii_redactions"):
        d = into.setdefault(k, {})
        for reason, n in other.get(k, {}).items():
            d[reason] = d.get(reason, 0) + n


def _sorted_counts(d: dict) -> dict:
    return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def balanced(c: dict) -> bool:
    """Whether a counts mapping accounts for every record and byte."""
    return (c["documents_in"] == c["documents_out"] + sum(c["dropped"].values()) + c["errors"]
            and c["bytes_in"] == c["bytes_out"] + sum(c["bytes_dropped"].values()) + c["bytes_errors"]
            + c["bytes_edited"])


def merge(name: str, step_names: list[str], shards: list[dict], examples_per_reason: int = 3) -> dict:
    """One report from the stats of every shard (in shard order, so examples are deterministic)."""
    total: dict = {k: 0 for k in COUNT_KEYS} | {"dropped": {}, "bytes_dropped": {}, "pii_redactions": {}}
    per_source: dict[str, dict] = {}
    steps = [{"step": n, "documents_in": 0, "dropped": 0, "changed": 0} for n in step_names]
    error_kinds: dict[str, int] = {}
    counters: dict[str, int] = {}
    examples: dict[str, list] = {}
    files, rejected, warnings = [], [], []
    for s in shards:
        _add(total, s)
        for src, c in s["per_source"].items():
            _add(per_source.setdefault(src, {k: 0 for k in COUNT_KEYS} | {"dropped": {}, "bytes_dropped": {},
                                                                             "pii_redactions": {}}), c)
        for agg, st in zip(steps, s["steps"]):
            for k in ("documents_in", "dropped", "changed"):
                agg[k] += st[k]
        for k, n in s["error_kinds"].items():
            error_kinds[k] = error_kinds.get(k, 0) + n
        for k, n in s.get("reader_counters", {}).items():
            counters[k] = counters.get(k, 0) + n
        for reason, ex in s["examples"].items():
            have = examples.setdefault(reason, [])
            have.extend(ex[: max(0, examples_per_reason - len(have))])
        warnings.extend(s.get("warnings", []))
        files.extend(s.get("files", []))
        rejected.extend(s.get("rejected_files", []))
    for st in steps:  # which reasons each step dropped for
        prefix = st["step"] + ":"
        st["reasons"] = _sorted_counts({r: n for r, n in total["dropped"].items() if r.startswith(prefix)})
    for c in [total, *per_source.values()]:
        c["dropped"] = _sorted_counts(c["dropped"])
        c["bytes_dropped"] = dict(sorted(c["bytes_dropped"].items()))
        c["pii_redactions"] = dict(sorted(c["pii_redactions"].items()))
    report: dict[str, Any] = {"name": name, **total}
    report["error_kinds"] = _sorted_counts(error_kinds)
    report["per_source"] = dict(sorted(per_source.items()))
    report["steps"] = steps
    report["reader_counters"] = dict(sorted(counters.items()))
    report["accounted"] = balanced(total) and all(balanced(c) for c in per_source.values())
    report["shards"] = len(shards)
    report["files"] = files
    report["rejected_files"] = rejected
    report["examples"] = {r: examples[r] for r in report["dropped"] if r in examples}
    report["warnings"] = warnings
    return report


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.2f}%" if d else "-"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def to_markdown(r: dict) -> str:
    """report.md: the same figures for people, with a few removed documents per reason."""
    n = r["documents_in"]
    lines = [f"# Cleaning report: {r['name']}", ""]
    run = r.get("run", {})
    if run:
        lines += [f"{run.get('shards', r['shards'])} shards ({run.get('shards_resumed', 0)} resumed from an earlier "
                  f"run), runner `{run.get('runner')}`, {run.get('workers')} workers, "
                  f"{run.get('wall_seconds', 0):.1f} s.", ""]
    lines += ["| | documents | MB |", "|---|---:|---:|",
              f"| read | {n:,} | {_mb(r['bytes_in'])} |",
              f"| kept | {r['documents_out']:,} ({_pct(r['documents_out'], n)}) | {_mb(r['bytes_out'])} |",
              f"| dropped | {sum(r['dropped'].values()):,} ({_pct(sum(r['dropped'].values()), n)}) | "
              f"{_mb(sum(r['bytes_dropped'].values()))} |",
              f"| errors | {r['errors']:,} ({_pct(r['errors'], n)}) | {_mb(r['bytes_errors'])} |",
              f"| cut from kept documents by steps | | {_mb(r['bytes_edited'])} |", "",
              f"Every record accounted for: **{'yes' if r['accounted'] else 'NO'}** "
              "(read = kept + dropped + errors, in documents and bytes, overall and per source).", ""]
    if r.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    if r["dropped"]:
        lines += ["## Removed, by reason", "", "| reason | documents | % of read | MB |", "|---|---:|---:|---:|"]
        lines += [f"| `{k}` | {v:,} | {_pct(v, n)} | {_mb(r['bytes_dropped'].get(k, 0))} |"
                  for k, v in r["dropped"].items()]
        lines.append("")
    if r["errors"]:
        lines += ["## Errors (records set aside in errors.jsonl), by kind", "", "| kind | records |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in r["error_kinds"].items()]
        lines.append("")
    lines += ["## Per source", "", "| source | read | kept | dropped | errors | MB read | MB kept |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for src, c in r["per_source"].items():
        lines.append(f"| {src} | {c['documents_in']:,} | {c['documents_out']:,} ({_pct(c['documents_out'], c['documents_in'])}) "
                     f"| {sum(c['dropped'].values()):,} | {c['errors']:,} | {_mb(c['bytes_in'])} | {_mb(c['bytes_out'])} |")
    lines.append("")
    if r["steps"]:
        secs = run.get("step_seconds", {})
        lines += ["## Per step", "", "| step | in | dropped | changed | seconds (all workers) |", "|---|---:|---:|---:|---:|"]
        for st in r["steps"]:
            lines.append(f"| {st['step']} | {st['documents_in']:,} | {st['dropped']:,} ({_pct(st['dropped'], st['documents_in'])}) "
                         f"| {st['changed']:,} | {secs.get(st['step'], 0):.2f} |")
        lines.append("")
    if r.get("pii_redactions"):
        lines += ["PII replaced in kept documents: "
                  + ", ".join(f"{k} {v:,}" for k, v in r["pii_redactions"].items()), ""]
    if r["reader_counters"]:
        lines += ["Reader notes: " + ", ".join(f"{k} {v:,}" for k, v in r["reader_counters"].items()), ""]
    if r["examples"]:
        lines += ["## Examples of removed documents", ""]
        for reason, exs in r["examples"].items():
            lines += [f"### `{reason}`", ""]
            for ex in exs:
                if "text" in ex:
                    text = ex["text"][:400].replace("```", "'''")
                    lines += [f"`{ex.get('id')}` ({ex.get('source')}):", "", "```", text + ("…" if len(ex["text"]) > 400 else ""), "```", ""]
                else:
                    lines += [f"- `{ex.get('file')}` ({ex.get('bytes', 0):,} bytes)"]
            lines.append("")
    lines += ["Chart: removals.png. Machine-readable: report.json. Unreadable records: errors.jsonl.", ""]
    return "\n".join(lines)


def plot_removals(r: dict, path: str) -> None:
    """A horizontal bar chart of removed documents by reason (drops and error kinds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, v) for k, v in r["dropped"].items()] + [(f"error:{k}", v) for k, v in r["error_kinds"].items()]
    items.sort(key=lambda kv: (kv[1], kv[0]))
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.32 * len(items) + 1.2)))
    if items:
        labels, values = zip(*items)
        colors = ["#c0392b" if k.startswith("error:") else "#2c7fb8" for k in labels]
        ax.barh(range(len(items)), values, color=colors)
        ax.set_yticks(range(len(items)), labels, fontsize=8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,} ({_pct(v, r['documents_in'])})", va="center", fontsize=7)
        ax.set_xlim(0, max(values) * 1.25)
    else:
        ax.text(0.5, 0.5, "nothing removed", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("documents")
    ax.set_title(f"{r['name']}: {r['documents_in']:,} read, {r['documents_out']:,} kept", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def write_report(out_dir: str, r: dict) -> None:
    """Writes report.json, report.md and removals.png into `out_dir` (each replaced atomically)."""
    def atomic(name: str, text: str) -> None:
        tmp = os.path.join(out_dir, f".tmp.{name}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))

    atomic("report.json", json.dumps(r, ensure_ascii=False, indent=1) + "\n")
    atomic("report.md", to_markdown(r))
    tmp = os.path.join(out_dir, ".tmp.removals.png")
    plot_removals(r, tmp)
    os.replace(tmp, os.path.join(out_dir, "removals.png"))
