"""Interactive figures: ipywidgets controls generated from a results Dataset's coordinates.

One module serves every figure notebook of the book. A figure function
``fn(ds, *, select=None, reduce="median", vlim=None) -> matplotlib.figure.Figure`` and a results
Dataset become an app: one ``SelectMultiple`` filter per grid axis (its options are the axis's
coordinate values, never a hard-coded list), a ``Reduction mode`` dropdown (min/mean/median/max)
and, for figures with a colour scale, a ``Colour range`` slider spanning the data. Changing any
control redraws the figure in place: the figure is rendered to PNG and re-displayed inside an
``ipywidgets.Output``, which works in JupyterLab, in Voilà and in an executed notebook alike.

    app = figure_app(imaging_conditions, load_database("results/laptop/defocus.nc"))
    app  # in a notebook cell
"""

from __future__ import annotations

import base64
import html
import io
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from .database import REDUCTIONS, check_reduction
from .figures._common import (
    AXIS_LABELS,
    axis_label,
    format_value,
    metric_title,
    value_range,
    var_of,
)

# dimensions that index *what* a model is evaluated on or *when*, not which model it is: they
# never become filters (a figure decides which stage and evaluation domain it shows)
NON_GRID_DIMS = ("stage", "eval_domain", "epoch", "test_image", "count")
PLACEHOLDER_DPI = 110
NO_METADATA = {"Software": None}  # (matplotlib writes its name unless told otherwise)

FigureFunction = Callable[..., Figure]


def grid_axes(ds: xr.Dataset) -> list[str]:
    """The grid axes of a results Dataset (its dimensions that identify a model), in order."""
    return [str(d) for d in ds.dims if d not in NON_GRID_DIMS]


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python scalar widgets and ``results.query`` compare against."""
    return value.item() if isinstance(value, np.generic) else value


def axis_options(ds: xr.Dataset, axes: Sequence[str] | None = None) -> dict[str, list[tuple]]:
    """``{axis: [(label, value), ...]}`` for each grid axis, read from the Dataset's coordinates."""
    axes = grid_axes(ds) if axes is None else list(axes)
    unknown = [a for a in axes if a not in ds.dims]
    if unknown:
        raise ValueError(
            f"axes {unknown} are not dimensions of the Dataset; allowed: {list(ds.dims)}"
        )
    return {a: [(format_value(_plain(v)), _plain(v)) for v in ds[a].values.tolist()] for a in axes}


def data_range(ds: xr.Dataset, var: str = "final_loss") -> tuple[float, float]:
    """Finite (min, max) of ``ds[var]`` as every figure's colour range (:func:`value_range`)."""
    return value_range(ds[var])


def figure_png(
    fig: Figure, dpi: int = PLACEHOLDER_DPI, metadata: Mapping[str, str] | None = None
) -> bytes:
    """PNG bytes of a figure (rendered with the Agg canvas; no pyplot state involved)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=dict(metadata or {}))
    return buf.getvalue()


# a PNG's 8-byte signature and its header chunk (IHDR: length, type, 13 bytes, CRC)
_PNG_HEAD = 8 + 4 + 4 + 13 + 4


def png_with_text(png: bytes, text: Mapping[str, str]) -> bytes:
    """``png`` with ``text`` as Latin-1 ``tEXt`` chunks after its header (PNG specification,
    section 11.3.4): the metadata a placeholder records, added to a figure already rendered
    instead of rendering it again (~1 s a figure)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    extra = b"".join(
        chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
        for key, value in text.items()
    )
    return png[:_PNG_HEAD] + extra + png[_PNG_HEAD:]


def save_placeholder(
    fig: Figure | bytes, path: str | Path, *, reduction: str, **metadata: str
) -> Path:
    """Write the static placeholder PNG of a figure, recording its reduction in the PNG metadata.

    The book's captions name the reduction of their placeholder; the ``reduction`` text chunk lets
    a test compare the two without re-running anything.
    """
    check_reduction(reduction, name="reduction")
    return _write_placeholder(fig, path, {"reduction": reduction}, metadata)


def _write_placeholder(
    fig: Figure | bytes, path: str | Path, head: Mapping[str, str], metadata: Mapping[str, Any]
) -> Path:
    """Write ``fig`` (a figure, or the PNG :func:`figure_png` rendered of it without metadata)
    with the placeholder's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**head, "Software": "hrtem-book", **{k: str(v) for k, v in metadata.items()}}
    png = png_with_text(fig, meta) if isinstance(fig, bytes) else figure_png(fig, metadata=meta)
    path.write_bytes(png)
    return path


def _select_layout(options: Sequence[tuple[str, Any]], description: str = "") -> W.Layout:
    """A fixed width that fits the description beside the longest option (in an HBox an "auto"
    width shrinks the list to a ~25 px sliver)."""
    longest = max((len(label) for label, _ in options), default=4)
    return W.Layout(width=f"{len(description) + max(longest, 6) + 8}ch", flex="0 0 auto")


def _describe(fn: Callable) -> str:
    """``"figure: imaging conditions"`` for a figure function named ``imaging_conditions``."""
    return "figure: " + getattr(fn, "__name__", "figure").strip("_").replace("_", " ")


class _App:
    """What every app shares: an ``output`` the figure is drawn into, the latest ``figure`` and
    its ``png``, and a display that works with and without a kernel.

    Displayed, an app is one output of two representations: the live widget (a Jupyter front
    end with a kernel — JupyterLab, Voilà, a book page whose kernel is connected — renders it)
    and the current figure as an image (``text/html`` with the PNG inline, and ``image/png``),
    which a static page shows instead: a MyST HTML book without a kernel drops the widget view
    and renders the image.
    """

    widget: W.Widget
    output: W.Output
    figure: Figure | None = None
    png: bytes | None = None
    description = "figure"  # the image's alternative text

    def _show(self, fig: Figure) -> None:
        """Keep ``fig`` as the current figure and draw it into the output."""
        self.figure = fig
        self.png = figure_png(fig, metadata=NO_METADATA)
        data = {"image/png": base64.b64encode(self.png).decode("ascii"),
                "text/plain": f"<{self.description}>"}  # fmt: skip
        self._set_output({"output_type": "display_data", "data": data, "metadata": {}})

    def _say(self, text: str) -> None:
        """Replace the figure by a line of text (a selection that leaves nothing to draw)."""
        self._set_output({"output_type": "stream", "name": "stdout", "text": text + "\n"})

    def _set_output(self, output: dict) -> None:
        """Show one nbformat output in ``self.output`` by setting its ``outputs`` state (a comm
        update from the kernel), never by display messages captured inside ``with output:``: a
        front end that emulates the Output widget (nbclient under papermill) answers those with
        a comm_msg on the shell channel while it awaits the cell's execute_reply on that same
        socket, and then misses the reply (pyzmq asyncio poll, edge-triggered FD) forever."""
        self.output.outputs = (output,)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = dict(self.widget._repr_mimebundle_())
        bundle["text/plain"] = f"Interactive {self.description} (needs a running kernel)"
        if self.png is not None:
            data = base64.b64encode(self.png).decode("ascii")
            alt = html.escape(self.description, quote=True)
            bundle["image/png"] = data
            bundle["text/html"] = (
                f'<img src="data:image/png;base64,{data}" alt="{alt}" style="max-width:100%">'
            )
        return bundle


class FigureApp(_App):
    """A figure function bound to a Dataset, with controls generated from its coordinates.

    ``filters`` names the grid axes that get a multi-select (default: every grid axis; each is
    labelled in words with its unit), ``initial`` preselects values of some of them,
    ``reduction`` is the default Reduction mode, ``metrics`` the choices of the Metric selector
    (passed to the figure function as ``metric``; empty: no selector, for figures that show no
    metric) and ``metric`` its default; ``colour_scale`` adds a colour-range slider spanning the
    finite values of the chosen metric (reset when the metric changes).

    Attributes: ``filters`` (axis → SelectMultiple), ``reduction`` and ``metric`` (Dropdowns;
    ``metric`` None without a selector), ``vlim`` (FloatRangeSlider or None), ``output`` (the
    Output the figure is drawn into), ``figure`` (the latest Figure) and ``widget`` (the app).
    """

    def __init__(
        self,
        figure_fn: FigureFunction,
        ds: xr.Dataset,
        *,
        filters: Sequence[str] | None = None,
        initial: Mapping[str, Sequence] | None = None,
        reduction: str = "median",
        metrics: Sequence[str] = ("loss", "dice"),
        metric: str = "loss",
        colour_scale: bool = False,
    ) -> None:
        check_reduction(reduction, name="reduction")
        if metrics and metric not in metrics:
            raise ValueError(f"metric={metric!r}; allowed: {', '.join(metrics)}")
        for m in metrics:
            var_of(m)  # a clear error for an unknown metric
        self.figure_fn = figure_fn
        self.description = _describe(figure_fn)
        self.ds = ds
        initial = dict(initial or {})
        options = axis_options(ds, filters)
        unknown = [a for a in initial if a not in options]
        if unknown:
            raise ValueError(f"initial selection names {unknown}; allowed axes: {list(options)}")
        style = {"description_width": "initial"}
        self.filters: dict[str, W.SelectMultiple] = {}
        for axis, opts in options.items():
            values = tuple(v for _, v in opts)
            chosen = tuple(_plain(v) for v in initial.get(axis, values))
            missing = [v for v in chosen if v not in values]
            if missing:
                raise ValueError(f"initial {axis}={missing} not in its coordinates {list(values)}")
            self.filters[axis] = W.SelectMultiple(
                options=opts,
                value=chosen,
                rows=min(len(opts), 6),
                description=axis_label(ds, axis),
                description_allow_html=False,
                layout=_select_layout(opts, axis_label(ds, axis)),
                style=style,
                tooltip="Ctrl- or Shift-click selects several values",
            )
        self.reduction = W.Dropdown(
            options=list(REDUCTIONS), value=reduction, description="Reduction mode", style=style
        )
        self.metric: W.Dropdown | None = None
        if metrics:
            self.metric = W.Dropdown(
                options=[(metric_title(m), m) for m in metrics],
                value=metric,
                description="Metric",
                style=style,
            )
        self.vlim: W.FloatRangeSlider | None = None
        if colour_scale:
            lo, hi = data_range(ds, var_of(metric))
            self.vlim = W.FloatRangeSlider(
                value=(lo, hi),
                min=lo,
                max=hi,
                step=(hi - lo) / 200,
                readout_format=".3g",
                description="Colour range",
                continuous_update=False,
                style=style,
                layout=W.Layout(width="28em"),
            )
        self._full_vlim = None if self.vlim is None else self.vlim.value
        self._user_vlim = False  # True once the reader moved the colour range
        self.default_kwargs = self.kwargs()  # what the static placeholder shows
        self.output = W.Output()
        self.figure: Figure | None = None
        self.png: bytes | None = None
        for control in self.controls:
            control.observe(self._on_change, names="value")
        head = [self.reduction] + [w for w in (self.metric, self.vlim) if w is not None]
        wrap = W.Layout(flex_flow="row wrap", align_items="flex-start")
        self.widget = W.VBox(
            [W.HBox(head, layout=wrap), W.HBox(list(self.filters.values()), layout=wrap),
             self.output],
        )  # fmt: skip
        self.redraw()

    @property
    def controls(self) -> list[W.ValueWidget]:
        extra = [w for w in (self.metric, self.vlim) if w is not None]
        return [self.reduction, *extra, *self.filters.values()]

    def selection(self) -> dict[str, list]:
        """The current filter values as a ``select`` mapping (axes left whole are omitted)."""
        select = {}
        for axis, widget in self.filters.items():
            all_values = [v for _, v in widget.options]
            if list(widget.value) != all_values:
                select[axis] = list(widget.value)
        return select

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the figure function for the current control values."""
        kw: dict[str, Any] = {"select": self.selection(), "reduce": self.reduction.value}
        if self.metric is not None:
            kw["metric"] = self.metric.value
        if self.vlim is not None and tuple(self.vlim.value) != tuple(self._full_vlim):
            kw["vlim"] = tuple(self.vlim.value)
        return kw

    def render(self) -> Figure:
        """A new Figure for the current control values (the app's display is not touched)."""
        return self.figure_fn(self.ds, **self.kwargs())

    def redraw(self) -> None:
        """Re-render and replace the figure shown in the Output widget."""
        if any(len(w.value) == 0 for w in self.filters.values()):
            self._say("Select at least one value of every filter.")
            return
        try:
            fig = self.render()
        except ValueError as exc:  # e.g. a selection that leaves nothing to plot
            self._say(f"Nothing to show: {exc}")
            return
        self._follow_colour_bar(fig)
        self._show(fig)

    def _follow_colour_bar(self, fig: Figure) -> None:
        """Until the reader sets it, the Colour range shows the limits the figure's colour bar
        was drawn with (the figure picks them from the cells it shows), not the data's range."""
        clims = [im.get_clim() for ax in fig.axes for im in ax.images]
        if self.vlim is None or self._user_vlim or not clims:
            return
        s = self.vlim
        lo = max(s.min, min(c[0] for c in clims))
        hi = min(s.max, max(c[1] for c in clims))
        if not lo < hi:
            return
        self._resetting = True
        try:
            s.value = (lo, hi)
        finally:
            self._resetting = False
        self._full_vlim = tuple(s.value)

    def _on_change(self, change) -> None:
        if getattr(self, "_resetting", False):
            return
        if self.vlim is not None and change.get("owner") is self.vlim:
            self._user_vlim = True
        if self.metric is not None and change.get("owner") is self.metric:
            self._reset_colour_range()
        self.redraw()

    def _reset_colour_range(self) -> None:
        """The colour slider spans the newly chosen metric's values (without redrawing twice)."""
        if self.vlim is None:
            return
        lo, hi = data_range(self.ds, var_of(self.metric.value))
        s = self.vlim
        self._resetting = True
        try:
            s.max, s.min = max(s.max, hi), min(s.min, lo)  # widen first: value stays valid
            s.value = (lo, hi)
            s.min, s.max, s.step = lo, hi, (hi - lo) / 200
        finally:
            self._resetting = False
        self._full_vlim = (lo, hi)
        self._user_vlim = False

    def save_placeholder(self, path: str | Path, **metadata: str) -> Path:
        """Write the placeholder PNG of the figure at the app's initial settings."""
        if self.figure is not None and self.kwargs() == self.default_kwargs:
            fig = self.png  # still the settings drawn on start: no second render
        else:
            fig = self.figure_fn(self.ds, **self.default_kwargs)
        reduction = self.default_kwargs["reduce"]
        return save_placeholder(fig, path, reduction=reduction, **metadata)


class SeriesApp(_App):
    """A figure drawn from several databases, one per dataset series (the companion study's
    matrices): ``fn(dbs, *, series, select, reduce, metric) -> Figure``.

    Controls: a ``Series`` multi-select (which databases to draw), a ``seed (replicate)``
    filter over the seeds the databases hold, the ``Reduction mode`` over the selected seeds and
    the ``Metric``. Attributes as :class:`FigureApp`: ``series``, ``filters``, ``reduction``,
    ``metric``, ``output``, ``figure``, ``widget``.
    """

    def __init__(
        self,
        figure_fn: FigureFunction,
        dbs: Mapping[str, xr.Dataset],
        *,
        reduction: str = "median",
        metrics: Sequence[str] = ("dice", "loss"),
        metric: str = "dice",
    ) -> None:
        check_reduction(reduction, name="reduction")
        if not dbs:
            raise ValueError("no databases: a SeriesApp needs at least one")
        if metric not in metrics:
            raise ValueError(f"metric={metric!r}; allowed: {', '.join(metrics)}")
        for m in metrics:
            var_of(m)
        self.figure_fn = figure_fn
        self.description = _describe(figure_fn)
        self.dbs = dict(dbs)
        style = {"description_width": "initial"}
        names = list(self.dbs)
        self.series = W.SelectMultiple(
            options=names, value=tuple(names), rows=min(len(names), 6), description="Series",
            style=style, layout=_select_layout([(n, n) for n in names], "Series"),
            tooltip="Ctrl- or Shift-click selects several values",
        )  # fmt: skip
        seeds = sorted({_plain(v) for ds in self.dbs.values() for v in ds["seed"].values})
        self.filters = {
            "seed": W.SelectMultiple(
                options=[(format_value(v), v) for v in seeds],
                value=tuple(seeds),
                rows=min(len(seeds), 6),
                description=AXIS_LABELS["seed"],
                style=style,
                layout=_select_layout([(format_value(v), v) for v in seeds], AXIS_LABELS["seed"]),
                tooltip="Ctrl- or Shift-click selects several values",
            )
        }
        self.reduction = W.Dropdown(
            options=list(REDUCTIONS), value=reduction, description="Reduction mode", style=style
        )
        self.metric = W.Dropdown(
            options=[(metric_title(m), m) for m in metrics],
            value=metric,
            description="Metric",
            style=style,
        )
        self.default_kwargs = self.kwargs()
        self.output = W.Output()
        self.figure: Figure | None = None
        self.png: bytes | None = None
        for control in (self.series, self.reduction, self.metric, *self.filters.values()):
            control.observe(lambda change: self.redraw(), names="value")
        self.widget = W.VBox(
            [
                W.HBox([self.reduction, self.metric]),
                W.HBox([self.series, *self.filters.values()]),
                self.output,
            ]
        )
        self.redraw()

    def kwargs(self) -> dict[str, Any]:
        seed = self.filters["seed"]
        select = {}
        if list(seed.value) != [v for _, v in seed.options]:
            select["seed"] = list(seed.value)
        return {
            "series": list(self.series.value),
            "select": select,
            "reduce": self.reduction.value,
            "metric": self.metric.value,
        }

    def redraw(self) -> None:
        if not self.series.value or not self.filters["seed"].value:
            self._say("Select at least one series and one seed.")
            return
        try:
            fig = self.figure_fn(self.dbs, **self.kwargs())
        except ValueError as exc:
            self._say(f"Nothing to show: {exc}")
            return
        self._show(fig)

    def save_placeholder(self, path: str | Path, **metadata: str) -> Path:
        """Write the placeholder PNG of the figure at the app's initial settings."""
        if self.figure is not None and self.kwargs() == self.default_kwargs:
            fig = self.png  # still the settings drawn on start: no second render
        else:
            fig = self.figure_fn(self.dbs, **self.default_kwargs)
        return save_placeholder(fig, path, reduction=self.default_kwargs["reduce"], **metadata)


class ChoiceApp(_App):
    """A figure that depends on one named choice (e.g. a profile's model), with a Dropdown.

    For figures drawn from something other than a results database, such as the architecture
    figure: ``fn(value) -> Figure`` for each ``options[label]``.
    """

    def __init__(
        self,
        fn: Callable[[Any], Figure],
        options: Mapping[str, Any],
        *,
        description: str,
        value: str | None = None,
    ) -> None:
        if not options:
            raise ValueError("options is empty: a ChoiceApp needs at least one choice")
        value = next(iter(options)) if value is None else value
        if value not in options:
            raise ValueError(f"value={value!r}; allowed: {', '.join(options)}")
        self.fn = fn
        self.description = _describe(fn)
        self.options = dict(options)
        self.default = value
        self.choice = W.Dropdown(options=list(options), value=value, description=description)
        self.output = W.Output()
        self.figure: Figure | None = None
        self.png: bytes | None = None
        self.choice.observe(lambda change: self.redraw(), names="value")
        self.widget = W.VBox([self.choice, self.output])
        self.redraw()

    def redraw(self) -> None:
        self._show(self.fn(self.options[self.choice.value]))

    def save_placeholder(self, path: str | Path, **metadata: str) -> Path:
        """Placeholder of the default choice; ``reduction`` is "none": no results are reduced."""
        if self.figure is not None and self.choice.value == self.default:
            fig = self.png  # the default choice is on display: no second render
        else:
            fig = self.fn(self.options[self.default])
        head = {"reduction": "none", "choice": self.default}
        return _write_placeholder(fig, path, head, metadata)


class ImagesApp(_App):
    """Example images of the simulated series: a ``series`` and a ``domain`` dropdown, an
    ``index`` slider (the image) and an ``overlay`` checkbox (the label's outline), drawn with
    :func:`hrtem_book.figures.example_images.example_images_figure`."""

    def __init__(self, series: Mapping[str, xr.Dataset]) -> None:
        from .figures.example_images import example_images_figure

        if not series:
            raise ValueError("no series: an ImagesApp needs at least one")
        self.fn = example_images_figure
        self.description = _describe(example_images_figure)
        self.data = dict(series)
        first = next(iter(self.data.values()))
        self.series = W.Dropdown(options=list(self.data), description="series")
        self.domain = W.Dropdown(options=self._domains(first), description="domain")
        n = int((first["split"].values == "train").sum() // len(self._domains(first)))
        self.index = W.IntSlider(value=0, min=0, max=max(n - 1, 0), description="image")
        self.overlay = W.Checkbox(value=True, description="mask overlay")
        self.output = W.Output()
        self.figure = None
        self.png = None
        self.series.observe(self._new_series, "value")
        for control in (self.domain, self.index, self.overlay):
            control.observe(lambda change: self.redraw(), "value")
        self.widget = W.VBox(
            [W.HBox([self.series, self.domain]), W.HBox([self.index, self.overlay]), self.output]
        )
        self.redraw()

    @staticmethod
    def _domains(ds: xr.Dataset) -> list:
        return list(dict.fromkeys(ds["domain"].values.tolist()))

    def _new_series(self, change) -> None:
        ds = self.data[self.series.value]
        with self.domain.hold_trait_notifications():
            self.domain.options = self._domains(ds)
        self.redraw()

    def redraw(self) -> None:
        ds = self.data[self.series.value]
        self._show(self.fn(ds, self.domain.value, self.index.value, self.overlay.value))


# the name the notebooks call; FigureApp's constructor is the whole factory
figure_app = FigureApp
