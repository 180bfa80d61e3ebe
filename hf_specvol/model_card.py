"""The model card (README.md) of a trained run: method, config, dataset, metrics and rank report."""

from __future__ import annotations

import json

import yaml


def model_card(results: dict) -> str:
    """Markdown with a YAML header, built from the content of `results.json`. Holds no credentials."""
    task, method, report = results["task"], results["method"], results["rank_report"]
    header = {
        "library_name": "transformers",
        "tags": ["hf_specvol", "spectral-volume", "boolean-functions", str(task.get("task"))],
        "model-index": [{
            "name": f"{results['model']['type']}-{task.get('task')}-n{task.get('n')}-k{task.get('k')}",
            "results": [{"task": {"type": "text-classification", "name": f"{task.get('task')} of bits"},
                         "metrics": [{"type": "accuracy", "value": results["test_accuracy"],
                                      "name": "test accuracy"}]}],
        }],
    }
    penalty = ("off (spectral_volume_coef = 0)" if not method.get("spectral_volume_coef")
               else f"lambda_max = {method['spectral_volume_coef']}, schedule `{method['spectral_schedule']}`, "
                    f"expansion window {method['spectral_expansion_epochs']} epochs")
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {results['model']['type']} trained on {task.get('task')}(n={task.get('n')}, k={task.get('k')})", "",
        "Trained from scratch with `hf_specvol`'s `SpectralVolumeTrainer`: the task loss plus lambda_t times the "
        "spectral volume penalty P = -(1/L) sum_l logdet(corr(W_l) + eps I) / r_l.", "",
        "## Method", "", f"- Spectral volume penalty: {penalty}.",
        f"- Parameters: {results['model']['parameters']:,}; optimizer steps: {results['global_step']}.", "",
        "## Dataset", "", "```json", json.dumps(task, indent=2), "```", "",
        "## Results", "",
        "| metric | value |", "|---|---|",
        f"| test accuracy | {results['test_accuracy']:.4f} |",
        f"| train accuracy | {results['train_accuracy']:.4f} |",
        f"| generalization gap (train - test accuracy) | {results['generalization_gap']:+.4f} |",
        f"| test loss - train loss | {results['loss_gap']:+.4f} |", "",
    ]
    for epoch, snap in sorted(report["snapshots"].items(), key=lambda kv: int(kv[0])):
        lines += [f"## Layer-wise ranks at epoch {epoch}", "", "| matrix | shape | erank | stable rank | log-volume |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{name}` | {'x'.join(map(str, s['shape']))} | {s['erank']:.2f} | {s['stable_rank']:.2f} | "
                  f"{s['log_volume']:.4f} |" for name, s in snap["layers"].items()]
        lines.append("")
    for label, ntk in (("initialization", report["ntk_init"]), ("end of training", report["ntk_final"])):
        if ntk:
            lines.append(f"- NTK at {label}: effective rank {ntk['erank']:.2f}, kernel-target alignment "
                         f"{ntk['alignment']:.4f}, distance from init {ntk['distance']:.4f}.")
    lam = report.get("lambda")
    if lam and lam.get("schedule"):
        lines.append(f"- lambda ({lam['schedule']}): max {lam['max']:.4g}, mean {lam['mean']:.4g}, on for "
                     f"{lam['steps_with_penalty']} steps; lazy -> rich transition step: {lam['transition_step']}.")
    lines += ["", "## Configuration", "", "```json", json.dumps(method, indent=2), "```", ""]
    return "\n".join(lines)
