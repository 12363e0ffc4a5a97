"""Figure functions: run on every study, draw the reduced data they claim, respect filters.

Also checks the book's static placeholders: each was drawn with the reduction its caption names.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

from hrtem_book.figures import generalization as gen  # noqa: E402
from hrtem_book.figures import hyperparameters as hp  # noqa: E402
from hrtem_book.figures import imaging_conditions as ic  # noqa: E402
from hrtem_book.figures import structure as ns  # noqa: E402
from hrtem_book.testing import synthetic_database  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRANSFER_STUDIES = ("defocus", "dose", "structure")


@pytest.fixture(scope="module")
def dbs():
    return {s: synthetic_database(s) for s in (*TRANSFER_STUDIES, "baseline")}


def image_data(ax) -> np.ndarray:
    return np.ma.filled(ax.images[0].get_array().astype(float), np.nan)


# --- every figure runs on every study it applies to ------------------------------------------
@pytest.mark.parametrize("study", TRANSFER_STUDIES)
@pytest.mark.parametrize(
    "fn",
    [
        ic.transfer_heatmaps,
        gen.ood_spread,
        gen.ood_bars,
        hp.loss_by_freeze,
        hp.compute_cost,
    ],
)
def test_transfer_figures_run_on_each_study(dbs, study, fn):
    for reduce in ("min", "median"):
        fig = fn(dbs[study], reduce=reduce)
        assert fig.axes and reduce in fig.get_suptitle() + "".join(a.get_title() for a in fig.axes)


@pytest.mark.parametrize(
    "fn", [hp.loss_by_transfer_size, hp.loss_by_lr_pair, ic.imaging_conditions]
)
def test_defocus_figures_run(dbs, fn):
    assert fn(dbs["defocus"], reduce="mean").axes


def test_structure_figures_run(dbs):
    assert ns.lattice_heatmaps(dbs["structure"]).axes
    assert ns.size_histograms(dbs["structure"], reduce="max").axes
    with pytest.raises(ValueError, match="size='huge'"):
        ns.lattice_heatmaps(dbs["structure"], size="huge")


def test_architecture_is_drawn_from_the_built_model():
    from hrtem_book.figures.architecture import architecture, model_summary
    from hrtem_book.models import build_model
    from hrtem_book.profiles import get_profile

    cfg = get_profile("smoke").model
    s = model_summary(cfg)
    n_params = sum(p.numel() for p in build_model(cfg).parameters())
    assert s["total"] == n_params == sum(s["parts"].values())
    assert s["trainable"]["none"] == s["parts"]
    assert s["trainable"]["encoder"]["encoder"] == 0 and s["trainable"]["decoder"]["decoder"] == 0
    assert s["decoder_channels"] == list(cfg.decoder_channels)
    assert architecture(cfg).axes


# --- the drawn values are the reductions they claim ------------------------------------------
@pytest.mark.parametrize("reduce", ["min", "mean", "median", "max"])
def test_heatmap_cells_are_the_reduction_over_the_cell(dbs, reduce):
    ds = dbs["defocus"]
    fig = ic.transfer_heatmaps(ds, reduce=reduce, select={"seed": [1]})
    before, after = (image_data(ax) for ax in fig.axes[:2])
    fn = {"min": np.nanmin, "mean": np.nanmean, "median": np.nanmedian, "max": np.nanmax}[reduce]
    loss = ds["final_loss"].sel(seed=[1])
    for i, p in enumerate(ds["pretrain_domain"].values):
        for j, t in enumerate(ds["target_domain"].values):
            cell = loss.sel(pretrain_domain=p, target_domain=t, stage="transfer", eval_domain=t)
            expected = fn(cell.values) if np.isfinite(cell.values).any() else np.nan
            np.testing.assert_allclose(after[i, j], expected, equal_nan=True)
            pre = loss.sel(pretrain_domain=p, stage="pretrain", eval_domain=t)
            np.testing.assert_allclose(before[i, j], fn(pre.values))
    assert np.all(np.isnan(np.diag(after)))  # target = pretraining domain is excluded


def test_distribution_groups_follow_the_filters(dbs):
    ds = dbs["defocus"]
    groups = hp.grouped_losses(ds, ["freeze"], select={"n_transfer": [64]}, reduce="max")
    assert list(groups) == ["no transfer", "none", "encoder", "decoder"]
    direct = hp.target_losses(ds, "transfer", {"n_transfer": [64], "freeze": ["encoder"]})
    expected = direct.max("seed", skipna=True).values.ravel()
    np.testing.assert_allclose(np.sort(groups["encoder"]), np.sort(expected[np.isfinite(expected)]))


# --- the baseline panels never swap -----------------------------------------------------------
def _loss_is_eval_domain(ds: xr.Dataset) -> xr.Dataset:
    """A copy whose loss on domain d is 1 + d/100 for every finished model: the role is legible."""
    ds = ds.copy(deep=True)
    code = 1.0 + ds["eval_domain"] / 100.0
    ds["final_loss"] = (ds["final_loss"] * 0 + code).transpose(*ds["final_loss"].dims)
    return ds


@pytest.mark.parametrize("pair", [(0.0, -10.0), (-10.0, 0.0), (0.0, 10.0)])
def test_baseline_panels_keep_their_roles(dbs, pair):
    base = _loss_is_eval_domain(dbs["baseline"])
    transfer = _loss_is_eval_domain(dbs["defocus"])
    a, b = pair
    fig = ic.baseline_comparison(
        base, transfer=transfer, select={"domain_a": [a], "domain_b": [b]}, reduce="median"
    )
    left, right = fig.axes[:2]
    for ax, dom in ((left, a), (right, b)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        np.testing.assert_allclose(lines["mixture"].get_ydata(), 1 + dom / 100)
        np.testing.assert_allclose(lines["transfer a → b"].get_ydata(), 1 + dom / 100)
        assert f"({dom:g} nm)" in ax.get_title()
    assert "loss on a" in left.get_title() and "loss on b" in right.get_title()


def test_baseline_roles_come_from_the_cell_not_the_sorted_pair(dbs):
    base = dbs["baseline"]
    d = ic.baseline_data(base, None, (0.0, -10.0), select={}, reduce="median")
    assert d["a"]["domain"] == 0.0 and d["b"]["domain"] == -10.0
    cell = base["final_loss"].sel(domain_a=0.0, domain_b=-10.0, mix="128:384", stage="mixture")
    expected = float(np.nanmedian(cell.sel(eval_domain=0.0).values))
    assert d["a"]["mixture"].sel(mix="128:384").item() == pytest.approx(expected)


def test_mixture_curves_place_every_model_on_the_share_of_b(dbs):
    """The study's axes: a loss that encodes the evaluation domain and the share of b puts each
    model where it belongs — the ends are the models trained on a or b alone (the defocus
    study's pretrainings), the mixtures in between, each transfer at the share of the mixture
    holding as many images of b; the values are reduced over the filtered models."""
    base = _loss_is_eval_domain(dbs["baseline"])
    transfer = _loss_is_eval_domain(dbs["defocus"])
    a, b = -10.0, 0.0
    c = ic.mixture_curve(base, transfer, (a, b), select={"seed": [1]}, reduce="median")
    assert sorted(c["b"]) == [0.0, 0.25, 0.5, 0.75, 1.0]  # 128:384 … and the two ends
    for role, dom in (("a", a), ("b", b)):
        assert all(v == pytest.approx(1 + dom / 100) for v in c[role].values())
        assert sorted(c["transfer"][role]) == [64 / 512, 128 / 512]
    raw = dbs["baseline"]["final_loss"].sel(domain_a=a, domain_b=b, mix="256:256", seed=1)
    plain = ic.mixture_curve(dbs["baseline"], dbs["defocus"], (a, b), select={"seed": [1]},
                             reduce="median")  # fmt: skip
    assert plain["b"][0.5] == pytest.approx(float(np.nanmedian(raw.sel(eval_domain=b).values)))
    ends = dbs["defocus"]["final_loss"].sel(stage="pretrain", pretrain_domain=b, seed=1)
    assert plain["b"][1.0] == pytest.approx(float(np.nanmedian(ends.sel(eval_domain=b).values)))
    fig = ic.mixture_curves(base, transfer=transfer, select={"domain_a": [a], "domain_b": [b]})
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"from scratch, on b (0 nm)", "from scratch, on a (-10 nm)",
                          "transfer a → b, on b", "transfer a → b, on a"}  # fmt: skip
    np.testing.assert_allclose(lines["from scratch, on b (0 nm)"].get_xdata(), sorted(c["b"]))


# --- per-domain bars respect every filter -----------------------------------------------------
@pytest.mark.parametrize("select", [{"freeze": ["encoder"]}, {"n_transfer": [64], "seed": [0]}])
def test_ood_bars_respect_filters(dbs, select):
    ds = dbs["defocus"]
    pair_sel = {"pretrain_domain": [-10.0], "target_domain": [10.0]}
    fig = gen.ood_bars(ds, select={**select, **pair_sel}, reduce="mean")
    before_bars, after_bars = fig.axes[0].containers[:2]
    loss = ds["final_loss"].sel(pretrain_domain=-10.0, target_domain=10.0)
    for axis, values in select.items():
        loss = loss.sel({axis: values})
    expected = loss.sel(stage="transfer").mean(
        [d for d in loss.dims if d not in ("eval_domain", "stage")], skipna=True
    )
    np.testing.assert_allclose([r.get_height() for r in after_bars], expected.values)
    unfiltered = gen.ood_bars(ds, select=pair_sel, reduce="mean")
    assert not np.allclose(
        [r.get_height() for r in after_bars],
        [r.get_height() for r in unfiltered.axes[0].containers[1]],
    )


# --- generalization measures (chapter 4) ------------------------------------------------------
def test_ood_gap_and_spread_by_hand():
    # two models, trained on domains 0 and 2, evaluated on domains 0, 1, 2
    losses = xr.DataArray(
        [[0.1, 0.4, 0.7], [0.3, 0.3, 0.3]],
        dims=("trained_on", "eval_domain"),
        coords={"trained_on": [0.0, 2.0], "eval_domain": [0.0, 1.0, 2.0]},
    )
    np.testing.assert_allclose(gen.id_loss(losses, "trained_on"), [0.1, 0.3])
    np.testing.assert_allclose(gen.ood_gap(losses, "trained_on"), [0.55 - 0.1, 0.0])
    np.testing.assert_allclose(gen.loss_spread(losses), [np.std([0.1, 0.4, 0.7]), 0.0])


def test_in_distribution_gap_is_zero_against_itself(dbs):
    ds = dbs["dose"].copy(deep=True)
    # make every transfer land exactly where the model pretrained on its target started
    pre = ds["final_loss"].sel(stage="pretrain")
    ref = pre.median([d for d in pre.dims if d not in ("pretrain_domain", "seed", "eval_domain")])
    ref = ref.rename(pretrain_domain="target_domain")
    after = ds["final_loss"].sel(stage="transfer")
    ds["final_loss"].loc[{"stage": "transfer"}] = (
        (ref.broadcast_like(after) * 0 + ref).where(np.isfinite(after)).transpose(*after.dims)
    )
    gap = gen.in_distribution_gap(ds)
    finite = np.isfinite(gap.values)
    assert finite.any()
    np.testing.assert_allclose(gap.values[finite], 0.0, atol=1e-12)


# --- static placeholders use the reduction their caption names -------------------------------
FIGURE_BLOCK = re.compile(r":::\{figure\} #app:([\w-]+)\n(.*?)\n:::", re.S)
OTHER_OWNERS = {"example-images"}  # notebooks written by the simulation side of the project
CAPTION_REDUCTION = re.compile(r"\b(min|mean|median|max)\s+over\b")


def _figure_blocks():
    for chapter in sorted((ROOT / "chapters").glob("*.md")):
        for label, body in FIGURE_BLOCK.findall(chapter.read_text()):
            yield chapter.name, label, body


def _notebook_reduction(path: Path) -> str | None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            m = re.search(r'^reduction\s*=\s*"(\w+)"', cell.source, re.M)
            return m.group(1) if m else None
    return None


def test_chapters_embed_figures():
    assert any(True for _ in _figure_blocks()), "no #app: figure in the chapters"


@pytest.mark.parametrize("chapter,label,body", list(_figure_blocks()))
def test_placeholder_uses_the_caption_reduction(chapter, label, body):
    from PIL import Image

    name = label.replace("-", "_")
    notebook = ROOT / "notebooks" / f"{name}.ipynb"
    if label in OTHER_OWNERS and not notebook.is_file():
        pytest.skip(f"{notebook.name} is not written yet")
    assert notebook.is_file(), f"{chapter}: #app:{label} has no notebook {notebook.name}"
    source = "".join(c.source for c in nbformat.read(notebook, as_version=4).cells)
    assert f"# | label: app:{label}" in source
    assert f'"{name}.png"' in source, f"{notebook.name} does not write figures/{name}.png"
    placeholder = re.search(r":placeholder: \.\./figures/([\w.]+)", body)
    assert placeholder and placeholder.group(1) == f"{name}.png"
    caption = body.split("\n", 2)[-1]
    named = CAPTION_REDUCTION.findall(caption)
    png_reduction = Image.open(ROOT / "figures" / f"{name}.png").text.get("reduction")
    if png_reduction in (None, "none"):  # drawn from a model or data, not reduced from results
        assert not named, f"{chapter}: caption of {label} names a reduction for a static drawing"
        return
    assert named, f"{chapter}: caption of {label} names no reduction ('<mode> over ...')"
    assert set(named) == {_notebook_reduction(notebook)} == {png_reduction}


# --- the figure notebooks follow the book's conventions ---------------------------------------
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.stem != "example_images")
# notebooks drawn from the simulated series, not from a results database: their parameters
DATA_NOTEBOOKS = {"heldout_gallery": ("profile", "project_root", "device", "figure_dir")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin_parameterised_and_clean(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be `parameters`"
    names = DATA_NOTEBOOKS.get(path.stem, ("profile", "results_dir", "reduction", "figure_dir"))
    for name in names:
        assert re.search(rf"^{name}\s*=", code[0].source, re.M), f"parameters cell lacks {name}"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    apps = [c for c in code if c.source.startswith("# | label: app:")]
    assert len(apps) <= 1, "one figure per notebook"
    if apps:
        label = apps[0].source.split("\n", 1)[0].removeprefix("# | label: app:")
        assert label == path.stem.replace("_", "-")
    assert len(code) <= 6, "figure notebooks stay thin: a few calls into hrtem_book"
