"""The plots of npcalls.analysis: saved as PNG, decoded, and checked to be real pictures."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pytest

mpl.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from npcalls import NOT_SET  # noqa: E402
from npcalls import analysis as A

S = 1_000_000_000
BASE = 1_795_668_428 * S


@pytest.fixture(scope="module")
def calls():
    """20 minutes of traffic: ~30 calls/s, lognormal holds, the last ones still up."""
    rng = np.random.default_rng(42)
    n = 36_000
    st = BASE + np.sort(rng.integers(0, 1200 * S, n))
    en = st + (rng.lognormal(np.log(60) - 0.5, 1.0, n) * S).astype(np.int64)
    now = BASE + 1200 * S
    en[en > now] = NOT_SET
    snap = np.zeros(n, [("key", "S16"), ("start", "<i8"), ("end", "<i8")])
    snap["key"] = np.char.add(b"c", np.arange(n).astype("S8"))
    snap["start"], snap["end"] = st, en
    return A.to_pandas(snap, now=now)


def check_png(path, min_w=300, min_h=150):
    """Decode the file and check it is a picture: big enough, not one flat colour."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    rgb = img[..., :3].reshape(-1, 3)
    colours = np.unique((rgb * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20, f"{len(colours)} colours: an empty plot?"
    # Not almost all background: the drawing covers a real part of the picture.
    background = np.all(rgb > 0.97, axis=1).mean()
    assert background < 0.97, f"{background:.1%} white"
    return img


def labels(ax):
    fig = ax.figure
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ticks


@pytest.mark.parametrize("how", ["max", "at"])
def test_concurrency_plot(calls, tmp_path, how):
    ax = A.plot_concurrency(calls, how=how)
    title, xl, yl, ticks = labels(ax)
    assert "Concurrent calls" in title and "UTC" in xl and "calls" in yl and "count" in yl
    assert len(ticks) >= 3
    # a time axis readable at a glance: no tick repeats the full date and time
    assert all(len(t) <= 12 for t in ticks), ticks
    peak = A.peak_concurrency(calls)
    assert any(f"{peak.count:,}" in t.get_text() for t in ax.get_legend().get_texts())
    line = ax.get_lines()[0]
    assert line.get_ydata().max() == (peak.count if how == "max" else
                                      A.concurrency(calls, how="at").max())
    ax.figure.savefig(tmp_path / "concurrency.png", dpi=80)
    plt.close(ax.figure)
    check_png(tmp_path / "concurrency.png")


def test_arrivals_plot(calls, tmp_path):
    ax = A.plot_arrivals(calls, "10s")
    title, xl, yl, ticks = labels(ax)
    assert "arrivals" in title.lower() and "10 s" in title
    assert "calls/s" in yl and "UTC" in xl and len(ticks) >= 3
    y = ax.get_lines()[0].get_ydata()
    assert 25 < np.mean(y) < 35            # 36,000 calls in 1,200 s
    ax.figure.savefig(tmp_path / "arrivals.png", dpi=80)
    plt.close(ax.figure)
    check_png(tmp_path / "arrivals.png")


@pytest.mark.parametrize("log", [False, True])
def test_duration_histogram(calls, tmp_path, log):
    ax = A.plot_durations(calls, bins=40, log=log)
    title, xl, yl, _ = labels(ax)
    assert "duration" in title.lower() and xl == "duration (s)" and "count" in yl
    assert ax.get_xscale() == ("log" if log else "linear")
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 40 and sum(heights) == (calls["state"] == "ended").sum()
    ax.figure.savefig(tmp_path / f"durations-{log}.png", dpi=80)
    plt.close(ax.figure)
    check_png(tmp_path / f"durations-{log}.png")


def test_plots_share_one_figure_and_empty_data_draws(tmp_path, calls):
    fig, axs = plt.subplots(3, 1, figsize=(8, 9), layout="constrained")
    A.plot_concurrency(calls, ax=axs[0])
    A.plot_arrivals(calls, ax=axs[1])
    A.plot_durations(calls, ax=axs[2], log=True)
    fig.savefig(tmp_path / "all.png", dpi=70)
    plt.close(fig)
    check_png(tmp_path / "all.png", min_h=500)
    empty = A.to_pandas(np.zeros(0, [("key", "S8"), ("start", "<i8"), ("end", "<i8")]))
    for f in (A.plot_concurrency, A.plot_arrivals, A.plot_durations):
        ax = f(empty)
        assert ax.get_title()
        plt.close(ax.figure)


def test_live_view_png_is_a_picture(calls, tmp_path):
    png = A._figure_png(lambda ax: A.plot_concurrency(calls, ax=ax), (9, 3))
    (tmp_path / "live.png").write_bytes(png)
    check_png(tmp_path / "live.png")
