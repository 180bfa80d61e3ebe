"""Tables and plots of a study (`runs.jsonl`) or of one finished run.

`write_report(records, out_dir)` writes `summary.csv`, `report.md` and PNG plots; `summarize(records)` gives
the per cell x method rows; `bootstrap_difference` the CI of specvol minus the best baseline. matplotlib is
imported only when plotting.

Command line:

    python -m hf_specvol.report outputs/study_default      # a study: rewrite its report and plots
    python -m hf_specvol.report outputs/majority_default   # one run: accuracy, ranks, NTK, lambda plots
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics

import numpy as np

logger = logging.getLogger(__name__)

COLUMNS = ("cell", "method", "runs", "failed", "test_acc_mean", "test_acc_std", "solved_frac", "median_steps_to_solve",
           "gen_gap_mean", "snapshot_epoch", "mean_erank_snapshot", "ntk_erank_init", "ntk_erank_snapshot",
           "ntk_alignment_init", "ntk_alignment_snapshot", "median_transition_step", "transitions", "runtime_s_mean")


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def _ntk(record, which, key):
    ntk = record.get(which)
    return None if not ntk else ntk.get(key)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (cell, method), cells and methods in order of first appearance: the columns of `COLUMNS`."""
    cell_order = {c: i for i, c in enumerate(dict.fromkeys(r["cell"] for r in records))}
    method_order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in records))}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["cell"], r["method"]), []).append(r)
    rows = []
    for (cell, method), rs in sorted(groups.items(), key=lambda kv: (cell_order[kv[0][0]], method_order[kv[0][1]])):
        ok = [r for r in rs if r["status"] == "ok"]
        acc = [r["test_accuracy"] for r in ok]
        epochs = {r.get("snapshot_epoch") for r in ok} - {None}
        rows.append({
            "cell": cell, "method": method, "runs": len(ok), "failed": len(rs) - len(ok),
            "test_acc_mean": _mean(acc), "test_acc_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
            "solved_frac": _mean([float(r["solved"]) for r in ok]),
            "median_steps_to_solve": _median([r["steps_to_solve"] for r in ok]),
            "gen_gap_mean": _mean([r["generalization_gap"] for r in ok]),
            "snapshot_epoch": min(epochs) if len(epochs) == 1 else None,
            "mean_erank_snapshot": _mean([r.get("mean_erank") for r in ok]),
            "ntk_erank_init": _mean([_ntk(r, "ntk_init", "erank") for r in ok]),
            "ntk_erank_snapshot": _mean([_ntk(r, "ntk_snapshot", "erank") for r in ok]),
            "ntk_alignment_init": _mean([_ntk(r, "ntk_init", "alignment") for r in ok]),
            "ntk_alignment_snapshot": _mean([_ntk(r, "ntk_snapshot", "alignment") for r in ok]),
            "median_transition_step": _median([r.get("transition_step") for r in ok]),
            "transitions": sum(r.get("transition_step") is not None for r in ok),
            "runtime_s_mean": _mean([r.get("runtime_s") for r in ok]),
        })
    return rows


def bootstrap_difference(a, b, num_resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean(a) - mean(b) and its percentile-bootstrap 95% CI (seeds resampled with replacement in each group).

    Returns:
        `(difference, low, high)`.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(a) or not len(b):
        raise ValueError("bootstrap_difference needs at least one value in each group.")
    rng = np.random.default_rng(seed)
    diffs = (rng.choice(a, (num_resamples, len(a))).mean(1) - rng.choice(b, (num_resamples, len(b))).mean(1))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(low), float(high)


def specvol_vs_best_baseline(records: list[dict], baselines=("plain", "weight_decay", "dropout", "mup")) -> list[dict]:
    """Per cell and specvol method: difference in test accuracy to the best baseline (highest mean), 95% CI."""
    out = []
    for cell in dict.fromkeys(r["cell"] for r in records):
        acc: dict[str, list[float]] = {}
        for r in records:
            if r["cell"] == cell and r["status"] == "ok":
                acc.setdefault(r["method"], []).append(r["test_accuracy"])
        present = [m for m in baselines if m in acc]
        if not present:
            continue
        best = max(present, key=lambda m: np.mean(acc[m]))
        for method in acc:
            if "specvol" in method:
                diff, low, high = bootstrap_difference(acc[method], acc[best])
                out.append({"cell": cell, "method": method, "best_baseline": best, "difference": diff,
                            "ci_low": low, "ci_high": high})
    return out


# --- text outputs --------------------------------------------------------------------------------------
def _f(value, spec=".3f"):
    return "–" if value is None else format(value, spec)


def _steps(value):
    return "–" if value is None else f"{value:.0f}"


def markdown_table(rows: list[dict]) -> str:
    header = ("| cell | method | n | test acc (mean ± std) | solved | median steps to 99% | gen. gap | "
              "erank @ep | NTK erank init → ep | NTK KTA init → ep | lazy→rich step (n) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        ep = f" (ep {r['snapshot_epoch']})" if r["snapshot_epoch"] else ""
        lines.append(
            f"| {r['cell']} | {r['method']} | {r['runs']}{'+' + str(r['failed']) + ' failed' if r['failed'] else ''} "
            f"| {_f(r['test_acc_mean'])} ± {_f(r['test_acc_std'])} | {_f(r['solved_frac'], '.0%')} "
            f"| {_steps(r['median_steps_to_solve'])} | {_f(r['gen_gap_mean'], '+.3f')} "
            f"| {_f(r['mean_erank_snapshot'], '.1f')}{ep} "
            f"| {_f(r['ntk_erank_init'], '.2f')} → {_f(r['ntk_erank_snapshot'], '.2f')} "
            f"| {_f(r['ntk_alignment_init'], '.3f')} → {_f(r['ntk_alignment_snapshot'], '.3f')} "
            f"| {_steps(r['median_transition_step'])} ({r['transitions']}) |")
    return "\n".join(lines)


def ci_table(diffs: list[dict]) -> str:
    lines = ["| cell | method | best baseline | Δ test acc | 95% bootstrap CI |", "|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['cell']} | {d['method']} | {d['best_baseline']} | {d['difference']:+.3f} "
                     f"| [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |")
    return "\n".join(lines)


def write_report(records: list[dict], out_dir: str, config=None, plots: bool = True) -> dict:
    """Write `summary.csv`, `report.md` and (if `plots`) PNG plots of a study's records into `out_dir`.

    Args:
        records (`list[dict]`): from `run_study` / `study.load_records`.
        out_dir (`str`): the study's output directory.
        config (`StudyConfig`, *optional*): adds the cells' descriptions to the report.
        plots (`bool`, defaults to `True`): also draw the PNGs.

    Returns:
        `dict` with `rows` (the summary) and `differences` (specvol vs best baseline).
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(records)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    diffs = specvol_vs_best_baseline(records)
    figures = plot_study(records, out_dir) if plots else []
    lines = [f"# Study report: {getattr(config, 'name', os.path.basename(os.path.abspath(out_dir)))}", ""]
    if config is not None and getattr(config, "description", ""):
        lines += [config.description.strip(), ""]
    if config is not None:
        lines += ["## Cells", ""] + [f"- **{c['name']}**: {c.get('why', '').strip()}" for c in config.cells] + [""]
    lines += ["## Results", "", "Test accuracy over seeds; *solved* = test accuracy >= 0.99; steps to 99% = first "
              "validation evaluation >= 0.99 (median over the seeds that got there); gen. gap = train - test "
              "accuracy; erank = mean layer-wise effective rank at the snapshot epoch; NTK at init and at the snapshot "
              "epoch; lazy→rich = first NTK measurement with kernel distance >= 0.05 or alignment gain >= 0.05 "
              "(median step, number of runs with a transition).", "", markdown_table(rows), "",
              "## Spectral volume vs the best baseline", "",
              ci_table(diffs) if diffs else "(no cell has both a specvol method and a baseline)", ""]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r['run_id']}: {r.get('error')}" for r in failed] + [""]
    if figures:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(f)[0]}]({f})" for f in figures] + [""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return {"rows": rows, "differences": diffs}


# --- plots -------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_method(records, cell):
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["cell"] == cell and r["status"] == "ok":
            out.setdefault(r["method"], []).append(r)
    return out


def _mean_curve(series: list[list[tuple[float, float]]]):
    """Mean and std over runs of y at the steps all runs share (runs may stop at different steps)."""
    steps = sorted(set.intersection(*(set(s for s, _ in run) for run in series))) if series else []
    values = np.array([[dict(run)[s] for s in steps] for run in series]) if steps else np.zeros((0, 0))
    return np.array(steps), values.mean(0) if len(steps) else values, values.std(0) if len(steps) else values


def _grid(plt, n_panels, width=4.0, height=3.0):
    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _legend(axes, **kwargs) -> None:
    """Legend on the first panel that has labelled lines (a panel may have none, e.g. no specvol method)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**kwargs)
            return


def _save(fig, out_dir, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=70)
    _shrink_png(os.path.join(out_dir, name))
    return name


def _shrink_png(path: str, colors: int = 128) -> None:
    """Re-save a plot with a palette of `colors` colors (about 3x smaller, fit for committing to docs/)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colors)
    small.save(path, optimize=True)


def plot_study(records: list[dict], out_dir: str) -> list[str]:
    """accuracy.png, erank.png, ntk.png, lambda.png and coord_check[_gpt2].png (if the study saved them)."""
    plt = _plt()
    cells = list(dict.fromkeys(r["cell"] for r in records if r["status"] == "ok"))
    color = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(r["method"] for r in records))}
    names = []
    if cells:
        fig, axes = _grid(plt, len(cells))
        for ax, cell in zip(axes, cells):
            for method, rs in _by_method(records, cell).items():
                steps, mean, std = _mean_curve([[(h["step"], h["accuracy"]) for h in r["eval_history"]] for r in rs])
                if len(steps):
                    ax.plot(steps, mean, label=method, color=color[method])
                    ax.fill_between(steps, mean - std, mean + std, alpha=0.12, color=color[method])
            ax.set(title=cell, xlabel="step", ylabel="validation accuracy", ylim=(0.4, 1.02))
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
        _legend(axes, fontsize=7)
        names.append(_save(fig, out_dir, "accuracy.png"))
        plt.close(fig)

        fig, axes = _grid(plt, len(cells))
        for ax, cell in zip(axes, cells):
            for method, rs in _by_method(records, cell).items():
                layers = list(rs[0].get("layer_erank") or {})
                if layers:
                    mean = [np.mean([r["layer_erank"].get(name, np.nan) for r in rs]) for name in layers]
                    ax.plot(range(len(layers)), mean, marker="o", label=method, color=color[method])
            ax.set(title=cell, xlabel="matrix index (model order)", ylabel="erank at snapshot epoch")
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
        _legend(axes, fontsize=7)
        names.append(_save(fig, out_dir, "erank.png"))
        plt.close(fig)

        keys = ("erank", "alignment", "distance")
        fig, axes = plt.subplots(len(keys), len(cells), figsize=(3.6 * len(cells), 2.6 * len(keys)), squeeze=False)
        for col, cell in enumerate(cells):
            for method, rs in _by_method(records, cell).items():
                for row, key in enumerate(keys):
                    steps, mean, _ = _mean_curve([[(h["step"], h[key]) for h in r["ntk_history"]] for r in rs])
                    if len(steps):
                        axes[row][col].plot(steps, mean, label=method, color=color[method])
            axes[0][col].set_title(cell, fontsize=9)
            for row, key in enumerate(keys):
                axes[row][col].set(xlabel="step", ylabel=f"NTK {key}")
                axes[row][col].grid(alpha=0.3)
        _legend(axes[0], fontsize=6)
        names.append(_save(fig, out_dir, "ntk.png"))
        plt.close(fig)

        fig, axes = _grid(plt, len(cells), height=2.6)
        for ax, cell in zip(axes, cells):
            for method, rs in _by_method(records, cell).items():
                if "specvol" in method:
                    steps, mean, _ = _mean_curve([[tuple(p) for p in r["lambda_history"]] for r in rs])
                    if len(steps):
                        ax.plot(steps, mean, label=method, color=color[method])
            ax.set(title=cell, xlabel="step", ylabel="lambda (mean over seeds)")
            ax.grid(alpha=0.3)
        _legend(axes, fontsize=7)
        names.append(_save(fig, out_dir, "lambda.png"))
        plt.close(fig)

    from .muparam import plot_coord_check

    for stem in ("coord_check", "coord_check_gpt2"):
        if os.path.exists(os.path.join(out_dir, f"{stem}.json")):
            with open(os.path.join(out_dir, f"{stem}.json")) as f:
                fig = plot_coord_check(json.load(f), save_to=os.path.join(out_dir, f"{stem}.png"))
            plt.close(fig)
            _shrink_png(os.path.join(out_dir, f"{stem}.png"))
            names.append(f"{stem}.png")
    return names


def plot_run(run_dir: str) -> list[str]:
    """Plots of one finished run (`results.json` + `tracking_history.json`): run_accuracy.png,
    run_ranks.png, run_ntk.png, run_lambda.png, written into `run_dir`."""
    from .callbacks import TRACKING_HISTORY
    from .pipeline import load_results

    plt = _plt()
    results = load_results(run_dir)
    with open(os.path.join(run_dir, TRACKING_HISTORY)) as f:
        history = json.load(f)
    names = []
    fig, ax = plt.subplots(figsize=(4.5, 3))
    curve = results["eval_history"]
    ax.plot([h["step"] for h in curve], [h["accuracy"] for h in curve], marker="o")
    ax.set(xlabel="step", ylabel="validation accuracy", title=f"test accuracy {results['test_accuracy']:.3f}")
    ax.grid(alpha=0.3)
    names.append(_save(fig, run_dir, "run_accuracy.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ranks = history["rank_history"]
    for layer in (ranks[0]["layers"] if ranks else {}):
        ax.plot([h["step"] for h in ranks], [h["layers"][layer]["erank"] for h in ranks], label=layer)
    ax.set(xlabel="step", ylabel="effective rank")
    _legend([ax], fontsize=6)
    ax.grid(alpha=0.3)
    names.append(_save(fig, run_dir, "run_ranks.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    ntk = history["ntk_history"]
    for ax, key in zip(axes, ("erank", "alignment", "distance")):
        ax.plot([h["step"] for h in ntk], [h[key] for h in ntk], marker=".")
        ax.set(xlabel="step", ylabel=f"NTK {key}")
        ax.grid(alpha=0.3)
    names.append(_save(fig, run_dir, "run_ntk.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3))
    lam = history["lambda_history"]
    ax.plot([s for s, _ in lam], [v for _, v in lam])
    ax.set(xlabel="step", ylabel="lambda")
    ax.grid(alpha=0.3)
    names.append(_save(fig, run_dir, "run_lambda.png"))
    plt.close(fig)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_specvol.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a study directory (runs.jsonl) or a run directory (results.json)")
    args = parser.parse_args(argv)
    from .study import RUNS, StudyConfig, load_records

    if os.path.exists(os.path.join(args.path, RUNS)):
        config, records = None, load_records(args.path)
        saved = os.path.join(args.path, "study_config.json")
        if os.path.exists(saved):  # written by run_study: keeps the cells' descriptions and the run order
            with open(saved) as f:
                config = StudyConfig(**json.load(f))
            by_id = {r["run_id"]: r for r in records}
            records = [by_id[run["run_id"]] for run in config.runs() if run["run_id"] in by_id]
        write_report(records, args.path, config)
        print(f"wrote {os.path.join(args.path, 'report.md')}, summary.csv and plots")
    elif os.path.exists(os.path.join(args.path, "results.json")):
        names = plot_run(args.path)
        print("wrote " + ", ".join(os.path.join(args.path, n) for n in names))
    else:
        parser.error(f"{args.path} has neither runs.jsonl (a study) nor results.json (a run).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
