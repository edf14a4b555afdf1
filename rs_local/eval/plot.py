"""The evaluation plot: refusal rate per prompt set against scale, with the KL curve.

One picture answers the question a sweep is about: where does the target set's refusal
fall, how long does the keep set hold, and how fast does the model drift (KL, right axis).
Judge rates are solid lines, the keyword baseline dashed in the same colour. Agg backend:
no display is needed (servers, CI).
"""

from __future__ import annotations

from pathlib import Path

from rs_local.eval.evaluate import EvalReport
from rs_local.files.figures import pyplot, save_png


def plot_report(report: EvalReport, path: str | Path, title: str | None = None) -> Path:
    """Save the refusal-vs-scale plot as PNG at ``path`` (atomically)."""
    plt = pyplot()
    path = Path(path)
    points = sorted(report.points, key=lambda p: p.scale)
    xs = [p.scale for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keywords_only = (report.meta.get("judge") or {}).get("backend") == "keywords"
    for i, name in enumerate(report.set_names()):
        pts = [p for p in points if name in p.sets]
        c = colors[i % len(colors)]
        xs_set = [p.scale for p in pts]
        judge_label = f"{name} (keywords)" if keywords_only else f"{name} (judge)"
        ax.plot(xs_set, [100 * p.sets[name].refusal_rate for p in pts], "o-", color=c, label=judge_label)
        if not keywords_only:
            ax.plot(xs_set, [100 * p.sets[name].keyword_rate for p in pts], "x--", color=c, alpha=0.6, label=f"{name} (keywords)")
    ax.set_xlabel("scale")
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    kl_pts = [p for p in points if p.kl is not None]
    handles, labels = ax.get_legend_handles_labels()
    if kl_pts:
        ax2 = ax.twinx()
        (line,) = ax2.plot([p.scale for p in kl_pts], [p.kl for p in kl_pts], "s:", color="black", label="KL (nats)")
        ax2.set_ylabel("KL(plain || steered), nats")
        ax2.set_ylim(bottom=0)
        handles.append(line)
        labels.append("KL (nats)")
    ax.legend(handles, labels, fontsize=7, loc="best")
    if len(set(xs)) > 1:
        ax.set_xlim(min(xs) - 0.05 * (max(xs) - min(xs)), max(xs) + 0.05 * (max(xs) - min(xs)))
    ax.set_title(title or str(report.meta.get("model", "refusal vs scale")), fontsize=9)
    return save_png(fig, plt, path)
