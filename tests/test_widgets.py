"""Widgets: controls come from a database's coordinates and every control redraws the figure."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hrtem_book.figures.imaging_conditions import imaging_conditions  # noqa: E402
from hrtem_book.testing import synthetic_database  # noqa: E402
from hrtem_book.widgets import (  # noqa: E402
    REDUCTIONS,
    axis_options,
    figure_app,
    grid_axes,
    save_placeholder,
)


@pytest.fixture(scope="module")
def defocus():
    return synthetic_database("defocus")


def heatmap_arrays(app) -> list[np.ndarray]:
    """The data drawn by the app's current figure (one array per heatmap panel)."""
    return [np.ma.filled(ax.images[0].get_array(), np.nan) for ax in app.figure.axes if ax.images]


def test_options_are_the_coordinates(defocus):
    options = axis_options(defocus)
    assert list(options) == grid_axes(defocus)
    assert "stage" not in options and "eval_domain" not in options
    for axis, opts in options.items():
        assert [v for _, v in opts] == defocus[axis].values.tolist()


def test_other_coordinates_give_other_options(defocus):
    narrowed = defocus.sel(n_transfer=[128], freeze=["none", "encoder"])
    app_full = figure_app(imaging_conditions, defocus)
    app_narrow = figure_app(imaging_conditions, narrowed)
    assert [v for _, v in app_full.filters["freeze"].options] == ["none", "encoder", "decoder"]
    assert [v for _, v in app_narrow.filters["freeze"].options] == ["none", "encoder"]
    assert [v for _, v in app_narrow.filters["n_transfer"].options] == [128]
    # a different study has different axes altogether
    dose_app = figure_app(imaging_conditions, synthetic_database("dose"))
    assert set(dose_app.filters) == {"pretrain_domain", "target_domain", "freeze", "seed"}


def test_control_names_for_the_browser(defocus):
    app = figure_app(imaging_conditions, defocus, colour_scale=True)
    assert app.reduction.description == "Reduction mode"
    assert list(app.reduction.options) == list(REDUCTIONS)
    assert app.metric is not None and app.metric.description == "Metric"
    assert list(app.metric.options) == [("cross-entropy loss", "loss"), ("Dice score", "dice")]
    # every filter in words, with the unit of its values where it has one
    assert {a: w.description for a, w in app.filters.items()} == {
        "pretrain_domain": "pretraining defocus [nm]",
        "target_domain": "target defocus [nm]",
        "n_transfer": "transfer images",
        "pretrain_lr": "pretraining learning rate",
        "transfer_lr": "transfer learning rate",
        "freeze": "frozen part",
        "seed": "seed (replicate)",
    }
    assert app.vlim is not None and app.vlim.description == "Colour range"


def test_metric_selector_redraws_and_rescales_the_colours(defocus):
    app = figure_app(imaging_conditions, defocus, colour_scale=True)
    loss = heatmap_arrays(app)
    clim_loss = app.figure.axes[0].images[0].get_clim()
    app.metric.value = "dice"
    dice = heatmap_arrays(app)
    assert app.kwargs()["metric"] == "dice" and "vlim" not in app.kwargs()
    expected = imaging_conditions(defocus, metric="dice").axes[1].images[0]
    np.testing.assert_allclose(dice[1], np.ma.filled(expected.get_array(), np.nan))
    finite = np.isfinite(loss[1]) & np.isfinite(dice[1])
    # Dice is high where the loss is low (synthetic: Dice = 1 - 0.8 loss, then reduced)
    assert np.corrcoef(loss[1][finite], dice[1][finite])[0, 1] < -0.9
    lo, hi = app.vlim.min, app.vlim.max
    assert (lo, hi) != clim_loss and 0 <= lo < hi <= 1
    assert float(defocus["final_dice"].max()) == pytest.approx(hi)


def test_reduction_mode_redraws_with_the_reduced_data(defocus):
    app = figure_app(imaging_conditions, defocus, reduction="min")
    low = heatmap_arrays(app)
    app.reduction.value = "max"
    high = heatmap_arrays(app)
    finite = np.isfinite(low[1])
    assert finite.any()
    # max over the same models is never below min, and differs somewhere (seeds add noise)
    assert np.all(high[1][finite] >= low[1][finite])
    assert np.any(high[1][finite] > low[1][finite])


def test_filter_redraws_with_the_filtered_data(defocus):
    app = figure_app(imaging_conditions, defocus)
    png_before = app.png
    app.filters["freeze"].value = ("encoder",)
    assert app.selection() == {"freeze": ["encoder"]}
    assert app.png != png_before
    # the drawn after-transfer map equals a direct median over the encoder-frozen models only
    drawn = heatmap_arrays(app)[1]
    expected = imaging_conditions(defocus, select={"freeze": ["encoder"]}).axes[1].images[0]
    np.testing.assert_allclose(drawn, np.ma.filled(expected.get_array(), np.nan))


def test_pretrain_target_filter_shrinks_the_map(defocus):
    app = figure_app(imaging_conditions, defocus)
    app.filters["target_domain"].value = (0.0, 10.0)
    assert heatmap_arrays(app)[1].shape == (3, 2)


def test_colour_range_reaches_the_figure(defocus):
    app = figure_app(imaging_conditions, defocus, colour_scale=True)
    app.vlim.value = (0.2, 0.3)
    assert app.figure.axes[0].images[0].get_clim() == pytest.approx((0.2, 0.3))


def test_colour_range_shows_the_drawn_colour_bar_until_the_reader_sets_it(defocus):
    """The slider spans the metric's values; its readout is what the colour bar shows."""

    def drawn(app):
        clims = [im.get_clim() for ax in app.figure.axes for im in ax.images]
        return min(c[0] for c in clims), max(c[1] for c in clims)

    app = figure_app(imaging_conditions, defocus, colour_scale=True)
    assert tuple(app.vlim.value) == pytest.approx(drawn(app))
    assert "vlim" not in app.kwargs()
    app.filters["freeze"].value = ("encoder",)
    assert tuple(app.vlim.value) == pytest.approx(drawn(app))
    app.vlim.value = (0.2, 0.3)  # the reader's choice sticks through other changes
    app.reduction.value = "max"
    assert drawn(app) == pytest.approx((0.2, 0.3)) and app.kwargs()["vlim"] == (0.2, 0.3)
    app.metric.value = "dice"  # a new metric: back to the colour bar
    assert tuple(app.vlim.value) == pytest.approx(drawn(app)) and "vlim" not in app.kwargs()


def test_empty_filter_keeps_the_last_figure(defocus):
    app = figure_app(imaging_conditions, defocus)
    fig = app.figure
    app.filters["seed"].value = ()
    assert app.figure is fig


def test_bad_arguments_name_the_value(defocus):
    with pytest.raises(ValueError, match="reduction='avg'"):
        figure_app(imaging_conditions, defocus, reduction="avg")
    with pytest.raises(ValueError, match="magnification"):
        figure_app(imaging_conditions, defocus, filters=["magnification"])
    with pytest.raises(ValueError, match="not in its coordinates"):
        figure_app(imaging_conditions, defocus, initial={"freeze": ["everything"]})


def test_placeholder_records_its_reduction(defocus, tmp_path):
    from PIL import Image

    app = figure_app(imaging_conditions, defocus, reduction="mean")
    app.reduction.value = "max"  # interactive changes do not alter the placeholder
    path = app.save_placeholder(tmp_path / "fig.png", profile="synthetic")
    meta = Image.open(path).text
    assert meta["reduction"] == "mean" and meta["profile"] == "synthetic"


def test_placeholder_reuses_the_figure_drawn_on_start(defocus, tmp_path):
    from PIL import Image

    calls = []

    def counted(ds, **kwargs):
        calls.append(kwargs)
        return imaging_conditions(ds, **kwargs)

    app = figure_app(counted, defocus, reduction="mean")
    app.save_placeholder(tmp_path / "fig.png", profile="synthetic")
    assert len(calls) == 1  # the notebooks save right after start: one render, not two
    # the image the app shows, pixel for pixel, with the text a rendered placeholder records
    again = save_placeholder(app.figure, tmp_path / "again.png", reduction="mean",
                             profile="synthetic")  # fmt: skip
    with (
        Image.open(tmp_path / "fig.png") as reused,
        Image.open(again) as rendered,
        Image.open(io.BytesIO(app.png)) as shown,
    ):
        reused.load()  # PIL checks every chunk's CRC
        assert reused.text == rendered.text
        assert reused.text["reduction"] == "mean" and reused.text["Software"] == "hrtem-book"
        assert np.array_equal(np.asarray(reused), np.asarray(shown))
    app.reduction.value = "max"
    app.save_placeholder(tmp_path / "fig.png")
    assert len(calls) == 3 and calls[-1]["reduce"] == "mean"


def test_option_labels_are_short_and_distinct():
    from hrtem_book.figures._common import format_value

    assert [format_value(v) for v in (1e-3, 2.5e-4, 1e-4, 3e-3, -10.0, 0.0, 64, "encoder")] == [
        "10⁻³",
        "2.5×10⁻⁴",
        "10⁻⁴",
        "3×10⁻³",
        "-10",
        "0",
        "64",
        "encoder",
    ]


# --- the companion study's app: several databases, one per series ------------------------------
@pytest.fixture(scope="module")
def companion():
    from hrtem_book.series import GENERALIZATION_SERIES

    return {s: synthetic_database(f"generalization-{s}") for s in GENERALIZATION_SERIES}


def matrix_panels(app) -> dict[str, np.ndarray]:
    """The deviation drawn in each panel of the app's figure, by panel title (the series)."""
    return {
        ax.get_title(): np.ma.filled(ax.images[0].get_array(), np.nan)
        for ax in app.figure.axes
        if ax.images and ax.get_visible()
    }


def test_series_app_draws_the_selected_series(companion):
    from hrtem_book.figures.companion import confusion_matrices, matrices
    from hrtem_book.widgets import SeriesApp

    app = SeriesApp(confusion_matrices, companion)
    assert set(matrix_panels(app)) == set(companion)
    app.series.value = ("magnification",)
    panels = matrix_panels(app)
    assert list(panels) == ["magnification"]
    # the panel is the deviation from the in-domain ideal: zero on the diagonal
    expected = matrices(companion, series=["magnification"])["magnification"][1].values
    np.testing.assert_allclose(panels["magnification"], expected)
    assert np.allclose(np.diag(panels["magnification"]), 0.0)


def test_series_app_seed_filter_and_reduction_redraw(companion):
    from hrtem_book.figures.companion import confusion_matrices, matrices
    from hrtem_book.widgets import SeriesApp

    app = SeriesApp(confusion_matrices, companion, reduction="median")
    app.series.value = ("dose",)
    app.filters["seed"].value = (1,)
    assert app.kwargs()["select"] == {"seed": [1]}
    one = matrices(companion, series=["dose"], select={"seed": [1]})["dose"][1].values
    np.testing.assert_allclose(matrix_panels(app)["dose"], one)
    png = app.png
    app.filters["seed"].value = (0, 1)
    app.reduction.value = "max"
    assert app.png != png
    app.metric.value = "loss"
    assert app.kwargs()["metric"] == "loss"
    fig = app.figure
    app.series.value = ()  # nothing selected: the last figure stays
    assert app.figure is fig


def test_training_curves_draw_each_model_at_home_and_away(companion):
    """The dynamics figure: per training domain, the validation metric per epoch on its own
    domain (solid) and the mean over the other domains (dashed), over the selected seeds."""
    from hrtem_book.figures.companion import training_curves
    from hrtem_book.widgets import SeriesApp

    app = SeriesApp(training_curves, companion)
    assert sum(ax.get_visible() for ax in app.figure.axes) == len(companion)
    app.series.value = ("structure",)
    app.filters["seed"].value = (1,)
    (ax,) = [a for a in app.figure.axes if a.get_visible()]
    ds = companion["structure"]
    history = ds["history_dice"].sel(stage="pretrain", seed=1)
    lines = ax.get_lines()
    ev = [str(v) for v in ds["eval_domain"].values]
    for i, train in enumerate(ds["train_domain"].values.tolist()):
        curves = history.sel(train_domain=train)
        home, away = lines[2 * i], lines[2 * i + 1]
        assert home.get_linestyle() == "-" and away.get_linestyle() == "--"
        np.testing.assert_allclose(home.get_ydata(), curves.isel(eval_domain=ev.index(train)))
        others = [j for j in range(len(ev)) if ev[j] != train]
        np.testing.assert_allclose(
            away.get_ydata(), curves.isel(eval_domain=others).mean("eval_domain")
        )
    app.metric.value = "loss"
    (ax,) = [a for a in app.figure.axes if a.get_visible()]
    assert ax.get_ylabel().startswith("cross-entropy loss")


def test_an_app_displays_as_the_widget_and_as_its_current_image(defocus):
    """One output, two representations: a kernel-backed front end renders the widget view, a
    static page (the MyST HTML book without a kernel) the image of the current figure; its
    plain text is no Python repr."""
    import base64

    app = figure_app(imaging_conditions, defocus)
    bundle = app._repr_mimebundle_()
    view = bundle["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == app.widget.model_id
    assert base64.b64decode(bundle["image/png"]) == app.png
    assert bundle["text/html"].startswith('<img src="data:image/png;base64,')
    assert bundle["image/png"] in bundle["text/html"]
    assert "imaging conditions" in bundle["text/html"]  # the alternative text
    assert "VBox(" not in bundle["text/plain"] and "object at" not in bundle["text/plain"]
    # the image follows the controls
    app.reduction.value = "max"
    assert base64.b64decode(app._repr_mimebundle_()["image/png"]) == app.png
