"""Pure Plotly figure builders: plain data in, a figure out (an explanatory empty figure for no data)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lib.data.rakuten import class_name
from lib.model.metrics import ABLATION_ROWS

TEMPLATE = "plotly_white"
PRIMARY = "#4f46e5"
SECONDARY = "#94a3b8"
GOOD = "#16a34a"
WARN = "#d97706"
BAD = "#dc2626"
FONT = "Inter, system-ui, -apple-system, Segoe UI, Roboto, sans-serif"
# Bars of a time series: about this many per window, so any window reads the same.
TIME_BUCKETS = 48
HISTOGRAM_BINS = 20
SMALL_COUNT = 5


def _layout(fig: go.Figure, height: int, title: str | None = None, **kwargs) -> go.Figure:
    """Shared look; ``title`` is kept in the figure's metadata (the page's card shows the heading)."""
    settings = {
        "template": TEMPLATE,
        "height": height,
        "margin": {"l": 10, "r": 10, "t": 30, "b": 10, **kwargs.pop("margin", {})},
        "font": {"family": FONT, "size": 12},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
        "meta": {"title": title} if title else None,
    }
    fig.update_layout(**(settings | kwargs))
    return fig


def message_figure(message: str, height: int = 260) -> go.Figure:
    """An empty figure that says why it is empty."""
    fig = go.Figure()
    fig.add_annotation(
        text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"color": "#64748b"}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height)


def class_label(code: int) -> str:
    return f"{code} · {class_name(code)}"


def class_distribution_figure(class_counts: Mapping[int, int]) -> go.Figure:
    """Products per class, largest first (horizontal bars with the class names)."""
    if not class_counts:
        return message_figure("No labelled products in the catalogue yet.")
    counts = pd.Series(class_counts).sort_values()
    fig = go.Figure(
        go.Bar(
            x=counts.to_numpy(),
            y=[class_label(c) for c in counts.index],
            orientation="h",
            marker_color=PRIMARY,
            hovertemplate="%{y}<br>%{x} products<extra></extra>",
        )
    )
    return _layout(fig, max(300, 22 * len(counts)), title="Products per class", xaxis_title="products")


def confidence_gauge(confidence: float, abstain_threshold: float | None = None) -> go.Figure:
    """The top class's probability as a gauge (the band below the abstain threshold shaded red)."""
    steps = []
    if abstain_threshold is not None:
        steps = [{"range": [0, abstain_threshold * 100], "color": "#fee2e2"}]
    fig = go.Figure(
        go.Indicator(
            mode="gauge+number",
            value=confidence * 100,
            number={"suffix": " %", "valueformat": ".1f", "font": {"size": 26}},
            gauge={"axis": {"range": [0, 100]}, "bar": {"color": PRIMARY}, "steps": steps},
            title={"text": "confidence", "font": {"size": 12}},
        )
    )
    return _layout(fig, 150, title="Confidence", margin={"l": 30, "r": 30, "t": 30, "b": 0})


def _short(text: str, chars: int = 32) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def top5_figure(top5: list[dict]) -> go.Figure:
    """The five most likely classes with their probabilities (best on top)."""
    if not top5:
        return message_figure("The service returned no class scores.")
    rows = list(reversed(top5))
    names = [r.get("class_name") or class_name(r["prdtypecode"]) for r in rows]
    fig = go.Figure(
        go.Bar(
            x=[r["score"] for r in rows],
            y=[f"{r['prdtypecode']} · {_short(n)}" for r, n in zip(rows, names, strict=True)],
            orientation="h",
            marker_color=[SECONDARY] * (len(rows) - 1) + [PRIMARY],
            text=[f"{r['score']:.1%}" for r in rows],
            textposition="outside",
            cliponaxis=False,
            customdata=names,
            hovertemplate="%{customdata}<br>%{x:.1%}<extra></extra>",
        )
    )
    return _layout(
        fig, 220, title="Top-5 classes", xaxis={"range": [0, 1.1], "tickformat": ".0%"}, margin={"r": 40}
    )


def f1_history_figure(runs: pd.DataFrame, production_f1: float | None = None) -> go.Figure:
    """Test F1 (macro and weighted) of successive training runs, with production's F1 as a line."""
    runs = runs.dropna(subset=["test_f1_macro"]) if not runs.empty else runs
    if runs.empty:
        return message_figure("No finished training run yet.")
    # One category per run (evenly spaced, in order): runs minutes apart and days apart both read well.
    x = [pd.Timestamp(t).strftime("%Y-%m-%d %H:%M:%S") for t in runs["start"]]
    versions = runs["version"] if "version" in runs else pd.Series([None] * len(runs))
    labels = [f"v{v}" if isinstance(v, str) and v else "" for v in versions]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=x,
            y=runs["test_f1_macro"],
            mode="lines+markers+text",
            name="test F1-macro",
            text=labels,
            textposition="top center",
            line={"color": PRIMARY},
            marker={"size": 9},
            hovertemplate="%{x}<br>F1-macro %{y:.4f}<extra></extra>",
        )
    )
    if "test_f1_weighted" in runs:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=runs["test_f1_weighted"],
                mode="lines+markers",
                name="test weighted F1",
                line={"color": SECONDARY, "dash": "dot"},
                hovertemplate="%{x}<br>weighted F1 %{y:.4f}<extra></extra>",
            )
        )
    if production_f1 is not None:
        fig.add_hline(
            y=production_f1,
            line={"color": GOOD, "dash": "dash"},
            annotation_text=f"production {production_f1:.4f}",
            annotation_position="bottom right",
        )
    return _layout(
        fig,
        320,
        title="F1 over training runs",
        xaxis={"type": "category", "title": "training run (start, UTC)"},
        yaxis={"title": "F1 (test split)"},
    )


def per_class_f1_figure(per_class: pd.DataFrame | None) -> go.Figure:
    """F1 per class on the test split, worst first, coloured by level."""
    if per_class is None or per_class.empty:
        return message_figure("No per-class scores for this run (per_class_test.csv is missing).")
    frame = per_class.sort_values("f1", ascending=False)
    colours = [GOOD if f >= 0.8 else WARN if f >= 0.5 else BAD for f in frame["f1"]]
    names = frame["name"] if "name" in frame else frame["prdtypecode"].map(class_name)
    fig = go.Figure(
        go.Bar(
            x=frame["f1"],
            y=[f"{c} · {n}" for c, n in zip(frame["prdtypecode"], names, strict=True)],
            orientation="h",
            marker_color=colours,
            customdata=frame[["support"]].to_numpy() if "support" in frame else None,
            hovertemplate="%{y}<br>F1 %{x:.3f}"
            + ("<br>support %{customdata[0]}" if "support" in frame else "")
            + "<extra></extra>",
        )
    )
    return _layout(fig, max(300, 22 * len(frame)), title="F1 per class (test split)", xaxis={"range": [0, 1]})


def ablation_figure(ablation: Mapping[str, Mapping[str, float]] | None) -> go.Figure:
    """Test scores of the ablation heads (lib.model.metrics.ABLATION_ROWS; same hyperparameters)."""
    if not ablation:
        return message_figure("No ablation for this run.")
    order = [m for m in ABLATION_ROWS if m in ablation]
    metrics = [m for m in ("f1_macro", "f1_weighted", "accuracy") if any(m in ablation[k] for k in order)]
    colours = {"f1_macro": PRIMARY, "f1_weighted": SECONDARY, "accuracy": "#cbd5e1"}
    fig = go.Figure(
        [
            go.Bar(
                name=metric.replace("_", " "),
                x=order,
                y=[ablation[m].get(metric) for m in order],
                marker_color=colours[metric],
                # Only F1-macro (the selection metric) is labelled: three labels per group overlap.
                text=[f"{ablation[m].get(metric, 0):.3f}" for m in order] if metric == "f1_macro" else None,
                textposition="outside",
                hovertemplate="%{x}: %{y:.4f}<extra>" + metric + "</extra>",
            )
            for metric in metrics
        ]
    )
    return _layout(
        fig,
        300,
        title="Ablation: which inputs the head reads (test split)",
        barmode="group",
        yaxis={"range": [0, 1.05]},
    )


def count_ticks(largest: float) -> dict:
    """Axis ticks for counts: whole numbers only (plotly would tick 0.2, 0.4... for counts up to 5)."""
    return {"tickformat": ",d", "dtick": 1} if largest <= SMALL_COUNT else {"tickformat": ",d"}


def time_bucket(window: timedelta) -> str:
    """A pandas frequency giving about ``TIME_BUCKETS`` bars over ``window`` (at least one minute)."""
    minutes = max(1, round(window.total_seconds() / 60 / TIME_BUCKETS))
    return f"{minutes}min"


def predictions_timeline_figure(predictions: pd.DataFrame, window: timedelta) -> go.Figure:
    """Prediction volume (bars) and mean confidence (line) per time bucket."""
    if predictions.empty:
        return message_figure("No prediction in this window.")
    bucket = time_bucket(window)
    grouped = predictions.set_index("timestamp").resample(bucket)
    volume = grouped.size()
    confidence = grouped["confidence"].mean()
    end = max(predictions["timestamp"].max(), pd.Timestamp.now(tz="UTC"))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(
            x=volume.index,
            y=volume.to_numpy(),
            name="predictions",
            marker_color=SECONDARY,
            # Explicit width: with one bucket, plotly would otherwise stretch the bar over the whole axis.
            width=pd.Timedelta(bucket).total_seconds() * 1000 * 0.9,
            xperiod=pd.Timedelta(bucket).total_seconds() * 1000,
            xperiodalignment="start",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=confidence.index,
            y=confidence.to_numpy(),
            name="mean confidence",
            mode="lines+markers",
            connectgaps=False,
            line={"color": PRIMARY},
        ),
        secondary_y=True,
    )
    fig.update_xaxes(range=[end - window, end])
    fig.update_yaxes(
        title_text="predictions", rangemode="tozero", secondary_y=False, **count_ticks(volume.max())
    )
    fig.update_yaxes(
        title_text="mean confidence",
        range=[0, 1],
        dtick=0.2,
        tickformat=".0%",
        showgrid=False,
        secondary_y=True,
    )
    return _layout(fig, 300, title="Predictions over time")


def serving_series(predictions: pd.DataFrame, bucket: str) -> pd.DataFrame:
    """Per time bucket: requests/s, p50 and p99 latency (ms) and the head's mean batch size, from the
    prediction log's ``latency_ms`` and ``batch_size`` (rows logged before they existed are skipped)."""
    timed = (
        predictions.dropna(subset=["latency_ms"]).set_index("timestamp")
        if "latency_ms" in predictions
        else None
    )
    if timed is None or timed.empty:
        return pd.DataFrame(columns=["requests_per_s", "p50_ms", "p99_ms", "mean_batch"])
    grouped = timed.resample(bucket)
    return pd.DataFrame(
        {
            "requests_per_s": grouped.size() / pd.Timedelta(bucket).total_seconds(),
            "p50_ms": grouped["latency_ms"].quantile(0.5),
            "p99_ms": grouped["latency_ms"].quantile(0.99),
            "mean_batch": grouped["batch_size"].mean(),
        }
    )


def serving_figure(predictions: pd.DataFrame, window: timedelta) -> go.Figure:
    """Requests/s, p50/p99 latency and mean batch size over time (three stacked panels)."""
    series = serving_series(predictions, time_bucket(window))
    if series.empty:
        return message_figure("No prediction with serving timings in this window.")
    end = max(predictions["timestamp"].max(), pd.Timestamp.now(tz="UTC"))
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("requests/s", "latency (ms)", "mean batch size"))  # fmt: skip
    lines = [("requests_per_s", "requests/s", SECONDARY, 1), ("p50_ms", "p50", PRIMARY, 2),
             ("p99_ms", "p99", WARN, 2), ("mean_batch", "mean batch", GOOD, 3)]  # fmt: skip
    for column, name, color, row in lines:
        fig.add_trace(
            go.Scatter(x=series.index, y=series[column].to_numpy(), name=name, mode="lines+markers",
                       connectgaps=False, line={"color": color}),
            row=row, col=1,
        )  # fmt: skip
    fig.update_xaxes(range=[end - window, end])
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, 420, title="Serving")


def class_mix_figure(predicted: pd.Series, training_counts: Mapping[int, int]) -> go.Figure:
    """Share of each class among predictions next to its share in the production model's training data."""
    if predicted.empty and not training_counts:
        return message_figure("No prediction and no training class mix to compare.")
    pred_share = predicted.astype(int).value_counts(normalize=True) if not predicted.empty else pd.Series()
    train = pd.Series(training_counts, dtype=float)
    train_share = train / train.sum() if train.sum() else train
    codes = sorted(set(pred_share.index) | set(train_share.index))
    fig = go.Figure()
    if not train_share.empty:
        fig.add_trace(
            go.Bar(
                x=[str(c) for c in codes],
                y=[train_share.get(c, 0.0) for c in codes],
                name="training data",
                marker_color=SECONDARY,
                hovertext=[class_name(c) for c in codes],
            )
        )
    if not pred_share.empty:
        fig.add_trace(
            go.Bar(
                x=[str(c) for c in codes],
                y=[pred_share.get(c, 0.0) for c in codes],
                name="predictions",
                marker_color=PRIMARY,
                hovertext=[class_name(c) for c in codes],
            )
        )
    return _layout(
        fig,
        320,
        title="Class mix: predictions vs training data",
        barmode="group",
        xaxis={"title": "prdtypecode", "type": "category"},
        yaxis={"title": "share", "tickformat": ".0%"},
    )


def confidence_histogram_figure(predictions: pd.DataFrame) -> go.Figure:
    """Distribution of the top-class confidence, abstained predictions stacked apart."""
    if predictions.empty:
        return message_figure("No prediction in this window.")
    fig = go.Figure()
    abstained = (
        predictions["abstained"] if "abstained" in predictions else pd.Series(False, predictions.index)
    )
    for flag, name, colour in ((False, "answered", PRIMARY), (True, "abstained", WARN)):
        part = predictions.loc[abstained == flag, "confidence"]
        if not part.empty:
            fig.add_trace(
                go.Histogram(
                    x=part,
                    name=name,
                    marker_color=colour,
                    xbins={"start": 0, "end": 1, "size": 1 / HISTOGRAM_BINS},
                )
            )
    return _layout(
        fig,
        300,
        title="Confidence",
        barmode="stack",
        xaxis={"range": [0, 1], "tickformat": ".0%"},
        yaxis={"title": "predictions", **count_ticks(len(predictions))},
    )
