"""How an ``awqkit eval`` report reads: a Markdown table and a PNG of perplexities with their CIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from awqkit.markdown import markdown_table


def _dtype_cell(model: dict) -> str:
    saved = model["saved_dtype"]
    return model["dtype"] if saved in (None, model["dtype"]) else f"{model['dtype']} (saved {saved})"


def _result_cells(index: int, model: dict, result: dict) -> list[str]:
    cells = [
        f"#{index + 1} {model['name']}",
        _dtype_cell(model),
        f"{result['ppl']:.3f}",
        "{:.3f} - {:.3f}".format(*result["ppl_ci"]),
    ]
    if "vs_first" not in result:
        return cells + ["", "", ""]
    vs = result["vs_first"]
    return cells + [f"{vs['mean_nll_diff']:+.4f}", "[{:+.4f}, {:+.4f}]".format(*vs["ci"]), f"{vs['win_share']:.1%}"]


def format_table(report: dict) -> str:
    """The report as a Markdown table, one row per dataset and model."""
    config, models = report["config"], report["models"]
    headers = ["dataset", "bos", "windows", "tokens", "model", "dtype", "ppl", "ppl 95% CI"]
    headers += ["dNLL vs #1", "dNLL 95% CI", "wins vs #1"]
    rows = []
    for name, data in report["datasets"].items():
        dataset_cells = [name, "yes" if data["bos"] else "no", str(data["windows"]), str(data["tokens"])]
        for index, (model, result) in enumerate(zip(models, data["results"])):
            # The dataset columns are filled on its first row only, so each dataset reads as a block.
            rows.append((dataset_cells if index == 0 else [""] * 4) + _result_cells(index, model, result))
    limit = f", first {config['max_windows']} windows" if config["max_windows"] else ""
    samples = f", {config['n_samples']} samples, seed {config['seed']}" if config["mode"] == "samples" else ""
    head = (
        f"mode {config['mode']}, seq-len {config['seq_len']}{samples}{limit}; "
        "dNLL = mean token NLL of the model minus #1's, paired bootstrap 95% CI over windows"
    )
    return head + "\n\n" + markdown_table(headers, rows)


def plot_report(report: dict, path: str | Path) -> None:
    """A PNG with one panel per dataset: each model's perplexity and its bootstrap 95% CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = report["datasets"]
    # An explicit Agg canvas, not pyplot: no display needed and no global backend switched.
    figure = Figure(figsize=(1.5 + 3.5 * len(datasets), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]
    labels = [f"#{i + 1} {Path(m['name']).name}\n{m['dtype']}" for i, m in enumerate(report["models"])]
    for ax, (name, data) in zip(axes, datasets.items()):
        ppl = np.array([r["ppl"] for r in data["results"]])
        low, high = np.array([r["ppl_ci"] for r in data["results"]]).T
        x = np.arange(len(ppl))
        ax.bar(x, ppl, yerr=[ppl - low, high - ppl], capsize=5, color=[f"C{i % 10}" for i in x])
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{name} ({data['windows']} windows)")
        ax.set_ylabel("perplexity (95% CI)")
    figure.savefig(path, dpi=120)
