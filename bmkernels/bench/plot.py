"""PNG plots of `bmkernels bench` results (`bmkernels bench --plot DIR`, or `--plot DIR --from-json FILE`
to re-plot a saved run): attention time and saved memory vs sequence length per contender, per-layer
conv bars, GRU vs hidden size, whole-model bars. Works on the JSON form of the results (to_json), so
a run and a re-plot draw the same figures. Needs matplotlib (an optional dependency)."""

from __future__ import annotations

import os
from collections.abc import Callable


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _groups(results, key: Callable[[dict], tuple]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in results:
        out.setdefault(key(r), []).append(r)
    return out


def _measured(r, name, field="median_ms"):
    return r["contenders"].get(name, {}).get(field)


def _axes(plt, n, width, height):
    """A figure with n panels, at most three a row; the unused cells of the grid hidden."""
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _line_figure(plt, panels, x_of, y_field, y_label, title, scale=1.0):
    """One subplot per panel (title -> results); per contender a line of y_field against x_of(result)."""
    fig, axes = _axes(plt, len(panels), 5, 4)
    for ax, (panel, rs) in zip(axes, sorted(panels.items()), strict=True):
        rs = sorted(rs, key=x_of)
        for name in dict.fromkeys(n for r in rs for n in r["contenders"]):
            pts = [(x_of(r), _measured(r, name, y_field)) for r in rs]
            pts = [(x, y * scale) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([x_of(r) for r in rs], [r["shape_label"] for r in rs], rotation=30, fontsize=7)
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel(y_label)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _bar_figure(plt, panels, label_of, title):
    """One horizontal bar chart per panel: per case a group of bars, one per contender (median ms)."""
    height = max(len(rs) for rs in panels.values())
    fig, axes = _axes(plt, len(panels), 6, 1.2 + 0.45 * height)
    for ax, (panel, rs) in zip(axes, sorted(panels.items()), strict=True):
        names = list(dict.fromkeys(n for r in rs for n in r["contenders"]))  # every contender, in order
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ys = [i + j * width for i in range(len(rs))]
            ax.barh(ys, [_measured(r, name) or 0.0 for r in rs], height=width, label=name)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rs))], [label_of(r) for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median ms per call (log)")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _attention(plt, rs):
    for r in rs:
        p = r["params"]
        r["shape_label"] = f"{p['B']}x{p['H']}x{p['L']}x{p['D']}"
    panels = _groups(
        rs, lambda r: (f"{r['params']['pass']} {r['params']['dtype']} {'causal' if r['params']['causal'] else 'full'}",)
    )
    panels = {k[0]: v for k, v in panels.items()}
    figs = {
        "attention_time.png": _line_figure(
            plt,
            panels,
            lambda r: r["params"]["L"],
            "median_ms",
            "median ms per call (log)",
            "attention: time vs sequence length (B x H x L x D)",
        )
    }
    memory = {
        k: v for k, v in panels.items() if any(_measured(r, n, "saved_bytes") for r in v for n in r["contenders"])
    }
    if memory:
        figs["attention_memory.png"] = _line_figure(
            plt,
            memory,
            lambda r: r["params"]["L"],
            "saved_bytes",
            "saved activation MiB (log)",
            "attention: saved activation memory vs sequence length",
            scale=1 / 2**20,
        )
    return figs


def _conv(plt, rs):
    panels = _groups(rs, lambda r: (f"{r['params']['pass']} {r['params']['layout']}",))
    panels = {k[0]: v for k, v in panels.items()}
    # a case is named "<pass> <layout> <layer>": the bars are labelled by the layer
    return {
        "conv_layers.png": _bar_figure(
            plt, panels, lambda r: r["name"].split(" ", 2)[2], "conv2d per layer (+ bias + ReLU)"
        )
    }


def _gru(plt, rs):
    layers = [r for r in rs if "layers" in r["params"]]
    if not layers:
        return {}
    for r in layers:
        p = r["params"]
        r["shape_label"] = f"H{p['H']} T{p['T']} B{p['B']}" + (f" L{p['layers']}" if p["layers"] > 1 else "")
    panels = {k[0]: v for k, v in _groups(layers, lambda r: (r["params"]["pass"],)).items()}
    return {
        "gru_hidden.png": _line_figure(
            plt,
            panels,
            lambda r: r["params"]["H"],
            "median_ms",
            "median ms per call (log)",
            "GRU layers: time vs hidden size",
        )
    }


def _models(plt, rs):
    panels = {k[0]: v for k, v in _groups(rs, lambda r: (r["op"],)).items()}
    return {"models.png": _bar_figure(plt, panels, lambda r: r["name"], "whole models")}


# op -> figure builder(plt, results of that op) -> {file name: figure}
FIGURES = {"attention": _attention, "conv": _conv, "gru": _gru, "models": _models, "cnn_models": _models}


def plot(data: dict, directory: str) -> list[str]:
    """Write the PNGs of a results JSON (to_json's dict) into directory; return their paths."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    results = [dict(r) for r in data["results"]]
    by_op = _groups(results, lambda r: (r["op"],))
    builders: dict = {}
    for (op,), rs in by_op.items():
        if op in FIGURES:
            builders.setdefault(FIGURES[op], []).extend(rs)
    paths = []
    for build, rs in builders.items():
        for file, fig in build(plt, rs).items():
            path = os.path.join(directory, file)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
