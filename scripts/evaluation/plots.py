"""Report figures (matplotlib, headless): ROC and PR curves of every model in one figure each (as the paper's
Fig. 3) and a reliability diagram."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scripts.cache import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _style(name: str, reference: str) -> dict:
    return {"lw": 2.5, "color": "crimson", "zorder": 5} if name == reference else {"lw": 1.2}


def write_figures(report: dict, out_dir: Path) -> dict[str, Path]:
    """``roc.png``, ``pr.png`` and ``calibration.png`` from a :func:`scripts.evaluation.report.build_report` dict."""
    ref = report["protocol"]["reference"]
    models = report["models"]
    figs = {}
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, m in models.items():
        c = m["curves"]["roc"]
        auc = m["combined"]["auc"]
        ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {auc:.3f})", **_style(name, ref))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (combined predictions)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    figs["roc"] = _save(fig, out_dir / "roc.png")
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, m in models.items():
        c = m["curves"]["pr"]
        ax.step(c["recall"], c["precision"], where="post", label=f"{name} (AP {m['combined']['ap']:.3f})", **_style(name, ref))
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (combined predictions)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower left")
    figs["pr"] = _save(fig, out_dir / "pr.png")
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, m in models.items():
        c = m["calibration"]
        ax.plot(c["predicted"], c["observed"], marker="o", ms=3, label=f"{name} (ECE {c['ece']:.3f})", **_style(name, ref))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive", title="Calibration", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    figs["calibration"] = _save(fig, out_dir / "calibration.png")
    return figs
