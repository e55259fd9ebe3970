"""`danlu demo`: the embedded end-to-end job, from raw text on this machine to a loss curve and a
scaling fit.

corpus (the Python standard library's source and rendered docs) -> `danlu clean` (configs/data/demo.yaml:
normalised, PII replaced, exact and near duplicates removed, with a report) -> sentencepiece tokenizer
-> ArrayRecord token shards -> the `tiny` model trained on CPU -> loss.png -> a small IsoFLOP sweep
(configs/scaling/demo.yaml) fitted with Chinchilla's approaches -> fit.json and plots. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pretrain.config import CONFIGS_DIR, load_config


def run_demo(workdir: str | os.PathLike = "demo", *, minutes: float = 8.0, steps: int = 1200,
             vocab_size: int = 4096, max_bytes: int = 8_000_000, sweep: bool = True) -> dict:
    from data_pipeline import clean
    from data_pipeline.demo_corpus import build_demo_corpus
    from data_pipeline.tokenize import encode_to_shards, train_tokenizer
    from pretrain.plots import plot_loss
    from pretrain.train import train

    work = Path(workdir)
    shards, run_dir = work / "shards", work / "run"
    # the training config first: a bad --steps/--minutes is refused before any work
    base = load_config(CONFIGS_DIR / "train" / "tiny.yaml")
    cfg = load_config(CONFIGS_DIR / "train" / "tiny.yaml", [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={steps}",
        f"train.max_seconds={minutes * 60}", f"model.vocab_size={vocab_size}",
        f"optimizer.warmup_steps={min(base.optimizer.warmup_steps, steps // 10)}"])  # a short demo warms up less
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # --- 1. corpus --------------------------------------------------------------------------
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        stats = build_demo_corpus(str(corpus), max_bytes=max_bytes)
        print(f"[1/6] corpus: {stats} -> {corpus}")
    else:
        print(f"[1/6] corpus: reusing {corpus}")

    # --- 2. clean: normalise, replace PII, remove exact and near duplicates -------------------
    cleaned = work / "clean"
    job = clean.plan(clean.load_config(CONFIGS_DIR / "data" / "demo.yaml", inputs=[str(corpus)],
                                       output=str(cleaned)))
    report = clean.run_job(job, progress=False)  # finished shards are skipped on a rerun
    print(f"[2/6] clean: {report['documents_in']:,} documents in, {report['documents_out']:,} kept, "
          f"dropped {report['dropped']}, {report['errors']} errors -> {cleaned}/report.md")

    # --- 3. tokenizer and shards ------------------------------------------------------------
    if not (shards / "manifest.json").exists():
        docs = [str(cleaned / clean.DOCUMENTS_DIR)]  # its JSONL parts, in name order
        model = train_tokenizer(docs, str(work / "tokenizer"), vocab_size=vocab_size)
        manifest = encode_to_shards(docs, str(shards), model, num_shards=4, eval_fraction=0.02)
        print(f"[3/6] tokenizer {model}; shards {shards}: "
              f"{sum(s['tokens'] for s in manifest['shards']):,} tokens")
    else:
        print(f"[3/6] shards: reusing {shards}")

    # --- 4. train the tiny model ------------------------------------------------------------
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: same corpus and seed, same curve
    print(f"[4/6] training configs/train/tiny.yaml for at most {steps} steps / {minutes:g} min -> {run_dir}")
    summary = train(cfg)

    # --- 5. loss curve ------------------------------------------------------------------------
    png = plot_loss(run_dir, work / "loss.png")
    print(f"[5/6] loss curve: {png}")

    # --- 6. scaling: a small IsoFLOP sweep of tiny models, fitted ---------------------------
    fit_dir = work / "sweep" / "fit"
    if sweep:
        fit_dir = run_demo_sweep(work / "sweep")
    print(f"[6/6] scaling fit: {fit_dir / 'fit.json'}" if sweep else "[6/6] scaling sweep skipped")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
          + (f", eval loss {summary['final_eval_loss']:.3f}" if summary["final_eval_loss"] is not None else ""))
    print(f"  corpus       {corpus}\n  shards       {shards}\n  run          {run_dir} (metrics.jsonl, tensorboard/, "
          f"checkpoints/, config.yaml)\n  loss curve   {png}\n  cleaning     {cleaned}/report.md"
          + (f"\n  scaling fit  {fit_dir}/fit.json, isoflops.png, loss_vs_compute.png, contour.png" if sweep else ""))
    return {**summary, "loss_png": str(png), "clean_report": report,
            "fit_json": str(fit_dir / "fit.json") if sweep else None}


def run_demo_sweep(out: Path, bootstrap: int = 200) -> Path:
    """configs/scaling/demo.yaml into `out` (its runs are skipped when already in runs.csv), then
    `danlu fit` of its runs.csv into `out/fit`; returns that directory."""
    from pretrain.scaling.cmd_fit import summary as fit_summary
    from pretrain.scaling.fit import fit_all, read_runs
    from pretrain.scaling.plan import load_sweep
    from pretrain.scaling.plots import plot_all
    from danlu.sweep import run_here

    s = load_sweep(CONFIGS_DIR / "scaling" / "demo.yaml", [f"output={out}"])
    run_here(s)
    runs = read_runs(out / "runs.csv")
    fit = fit_all(runs, bootstrap=bootstrap)
    fit_dir = out / "fit"
    fit_dir.mkdir(parents=True, exist_ok=True)
    (fit_dir / "fit.json").write_text(json.dumps(fit, indent=1) + "\n")
    plot_all(runs, fit, fit_dir)
    print(fit_summary(fit))
    return fit_dir
