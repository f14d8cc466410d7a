"""Evaluation reports: HTML pages with PNG plots under settings.REPORTS_DIR, linked from the admin."""
from pathlib import Path

import numpy as np
from django.conf import settings
from django.template.loader import render_to_string
from django.utils import timezone

from catalog.models import CategorizerVersion, ModelVersion

CATEGORIZER_REPORT_FILES = ("index.html", "confusion.png", "per_category.png", "thresholds.png")
EVALUATION_REPORT_FILES = ("index.html", "summary.png", "search_per_category.png", "confusion.png")


def write_categorizer_report(*, version: CategorizerVersion, unlikely: list | None, unlikely_count: int | None,
                             unlikely_threshold: float) -> Path:
    """The categorizer version's report: held-out confusion matrix, per-category precision and recall, what an
    apply threshold means, and (for the version in service) the products whose category looks unlikely."""
    directory = Path(settings.REPORTS_DIR) / f"categorizer-{version.pk}"
    directory.mkdir(parents=True, exist_ok=True)
    metrics = version.metrics
    _plot_confusion(metrics["confusion"], directory / "confusion.png")
    _plot_per_category(metrics["per_category"], directory / "per_category.png")
    _plot_thresholds(metrics.get("thresholds", []), directory / "thresholds.png")
    per_category = sorted(metrics["per_category"].items(), key=lambda item: (-item[1]["support"], item[0]))
    html = render_to_string("catalog/categorizer_report.html", {
        "version": version,
        "metrics": metrics,
        "per_category": per_category,
        "thresholds": metrics.get("thresholds", []),
        "unlikely": unlikely,
        "unlikely_count": unlikely_count,
        "unlikely_threshold": unlikely_threshold,
        "written_at": timezone.now(),
    })
    (directory / "index.html").write_text(html)
    return directory / "index.html"


def new_figure(width: float, height: float):
    """A figure with no pyplot: no global state, the Agg canvas."""
    # Imported on first use: matplotlib takes a while to import, and only reports draw.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_confusion(confusion: dict, path: Path) -> None:
    labels, matrix = confusion["labels"], np.array(confusion["matrix"], dtype=float)
    size = min(4 + 0.4 * len(labels), 30)
    figure = new_figure(size + 1, size)
    axes = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlabel("predicted category")
    axes.set_ylabel("true category")
    axes.set_title("Held-out confusion matrix\n(colour: share of the true category, number: images)", fontsize=10)
    if len(labels) <= 25:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                axes.text(j, i, int(count), ha="center", va="center", fontsize=7,
                          color="white" if shares[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axes, shrink=0.7)
    figure.savefig(path)


def _plot_per_category(per_category: dict, path: Path) -> None:
    names = [n for n, v in sorted(per_category.items(), key=lambda item: -item[1]["support"]) if v["support"]]
    figure = new_figure(8, max(2.5, 0.35 * len(names) + 1))
    axes = figure.subplots()
    positions = np.arange(len(names))
    precision = [per_category[n]["precision"] or 0.0 for n in names]
    recall = [per_category[n]["recall"] or 0.0 for n in names]
    axes.barh(positions - 0.2, precision, height=0.4, label="precision")
    axes.barh(positions + 0.2, recall, height=0.4, label="recall")
    axes.set_yticks(positions, [f"{n} ({per_category[n]['support']})" for n in names], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of held-out images (category's images in brackets)")
    axes.set_title("Precision and recall per category", fontsize=10)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path)


def _plot_thresholds(table: list[dict], path: Path) -> None:
    figure = new_figure(6, 3.5)
    axes = figure.subplots()
    thresholds = [row["threshold"] for row in table]
    axes.plot(thresholds, [row["precision"] if row["precision"] is not None else np.nan for row in table],
              marker="o", label="precision: top suggestion right")
    axes.plot(thresholds, [row["coverage"] if row["coverage"] is not None else np.nan for row in table],
              marker="s", label="coverage: products reaching it")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("apply threshold")
    axes.set_title("What an apply threshold means (cross-fitted)", fontsize=10)
    axes.legend(loc="lower left")
    figure.savefig(path)


def write_evaluation_report(*, version: ModelVersion) -> Path:
    """A model's evaluation on the catalog, next to the model it was compared with (if any)."""
    directory = Path(settings.REPORTS_DIR) / f"model-{version.pk}"
    directory.mkdir(parents=True, exist_ok=True)
    metrics, theirs = version.metrics, version.compared_metrics or None
    compared = version.compared_with if theirs else None
    rows = [("search recall@1", ("search", "recall_at_1")), ("search recall@10", ("search", "recall_at_10")),
            ("search MRR", ("search", "mrr")), ("category top-1", ("categories", "top1")),
            ("category top-5", ("categories", "top5"))]
    summary = [(name, _figure(metrics, path), _figure(theirs, path)) for name, path in rows]
    _plot_summary(summary, compared is not None, directory / "summary.png")
    per_category = metrics["search"]["per_category"]
    _plot_search_per_category(per_category, (theirs or {}).get("search", {}).get("per_category"),
                              directory / "search_per_category.png")
    if metrics.get("categories"):
        _plot_confusion(metrics["categories"]["confusion"], directory / "confusion.png")
    html = render_to_string("catalog/evaluation_report.html", {
        "version": version, "compared": compared, "metrics": metrics, "summary": summary,
        "search_per_category": sorted(per_category.items()),
        "category_per_category": sorted((metrics.get("categories") or {}).get("per_category", {}).items()),
        "written_at": timezone.now(),
    })
    (directory / "index.html").write_text(html)
    return directory / "index.html"


def _figure(metrics: dict | None, path: tuple[str, str]):
    part = (metrics or {}).get(path[0])
    return part.get(path[1]) if part else None


def _plot_summary(summary: list, compared: bool, path: Path) -> None:
    figure = new_figure(7, 3.2)
    axes = figure.subplots()
    positions = np.arange(len(summary))
    width = 0.4 if compared else 0.6
    axes.bar(positions - (width / 2 if compared else 0), [m or 0 for _, m, _ in summary], width, label="this model")
    if compared:
        axes.bar(positions + width / 2, [t or 0 for _, _, t in summary], width, label="compared with")
    axes.set_xticks(positions, [name for name, _, _ in summary], fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_title("Search and category figures on the catalog's own images", fontsize=10)
    axes.legend(loc="lower right")
    figure.savefig(path)


def _plot_search_per_category(mine: dict, theirs: dict | None, path: Path) -> None:
    names = sorted(mine)
    figure = new_figure(8, max(2.5, 0.35 * len(names) + 1))
    axes = figure.subplots()
    positions = np.arange(len(names))
    axes.barh(positions - (0.2 if theirs else 0), [mine[n]["recall_at_1"] for n in names], height=0.4,
              label="this model")
    if theirs:
        axes.barh(positions + 0.2, [theirs.get(n, {}).get("recall_at_1", 0) for n in names], height=0.4,
                  label="compared with")
    axes.set_yticks(positions, [f"{n} ({mine[n]['queries']})" for n in names], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("recall@1 of the exact product (queries in brackets)")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path)
