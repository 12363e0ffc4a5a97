"""Results database: schema, storage round trip, validation errors, and the query API."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from hrtem_book.database import METRIC_VARS, query
from hrtem_book.results import (
    empty_database,
    load_database,
    save_database,
    validate_database,
)
from hrtem_book.studies import STUDIES
from hrtem_book.testing import synthetic_database


def _hand_database() -> xr.Dataset:
    """Dose study, 2 × 2 domains, two freeze options, two seeds, values written out by hand."""
    ds = empty_database(
        "dose",
        {
            "pretrain_domain": [30.0, 600.0],
            "target_domain": [30.0, 600.0],
            "freeze": ["none", "encoder"],
            "seed": [0, 1],
        },
        eval_domains=[30.0, 600.0],
        n_epochs=2,
        profile="hand",
        fixed={"pretrain_lr": 1e-4, "transfer_lr": 1e-5, "n_transfer": 128},
    )
    # transfer 30 → 600, evaluated on 600: (freeze, seed) -> best loss; encoder/seed 1 failed
    cell = {"pretrain_domain": 30.0, "target_domain": 600.0, "stage": "transfer"}
    for (freeze, seed), value in {
        ("none", 0): 0.2,
        ("none", 1): 0.6,
        ("encoder", 0): 0.3,
    }.items():
        ds["final_loss"].loc[{**cell, "freeze": freeze, "seed": seed, "eval_domain": 600.0}] = value
        ds["status"].loc[{"pretrain_domain": 30.0, "target_domain": 600.0, "freeze": freeze}] = "ok"
    ds["status"].loc[{"pretrain_domain": 30.0, "target_domain": 600.0, "freeze": "encoder",
                      "seed": 1}] = "failed"  # fmt: skip
    # the other direction, on 30: a single value
    ds["final_loss"].loc[
        {"pretrain_domain": 600.0, "target_domain": 30.0, "stage": "transfer", "eval_domain": 30.0,
         "freeze": "none", "seed": 0}
    ] = 0.5  # fmt: skip
    return ds


def test_query_matches_hand_computed_values():
    ds = _hand_database()
    sel = {"stage": "transfer", "eval_domain": 600.0, "pretrain_domain": 30.0}
    by_freeze = query(ds, "final_loss", sel, "mean", keep=["freeze"])
    assert by_freeze.dims == ("freeze",)
    np.testing.assert_allclose(by_freeze.sel(freeze="none"), (0.2 + 0.6) / 2)
    np.testing.assert_allclose(by_freeze.sel(freeze="encoder"), 0.3)  # the failed seed is skipped
    np.testing.assert_allclose(query(ds, "final_loss", sel, "min", ["freeze"]), [0.2, 0.3])
    np.testing.assert_allclose(query(ds, "final_loss", sel, "max", ["freeze"]), [0.6, 0.3])
    np.testing.assert_allclose(query(ds, "final_loss", sel, "median"), 0.3)
    np.testing.assert_allclose(query(ds, "final_loss", sel, "mean"), (0.2 + 0.6 + 0.3) / 3)
    # no selection: min over everything, kept per evaluation domain
    np.testing.assert_allclose(query(ds, "final_loss", keep=["eval_domain"]), [0.5, 0.2])
    # several values of one axis, and keep order decides the output dims
    two = query(ds, "final_loss", {"stage": "transfer", "pretrain_domain": [30, 600]}, "max",
                keep=["eval_domain", "pretrain_domain"])  # fmt: skip
    assert two.dims == ("eval_domain", "pretrain_domain")
    np.testing.assert_allclose(two.values, [[np.nan, 0.5], [0.6, np.nan]])
    # unreduced selection keeps every dim that was not selected away
    raw = query(ds, "status", {"pretrain_domain": 30.0, "target_domain": 600.0}, reduce=None)
    assert raw.sel(freeze="encoder", seed=1).item() == "failed"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"var": "accuracy"}, "unknown variable 'accuracy'; allowed: final_loss, "),
        ({"var": "final_loss", "select": {"defocus": 0}}, "no axis 'defocus'; allowed: "),
        ({"var": "final_loss", "select": {"freeze": "all"}}, "freeze='all' is not in the database"),
        ({"var": "final_loss", "select": {"seed": 7}}, "allowed: [0, 1]"),
        ({"var": "final_loss", "reduce": "sum"}, "unknown reduction 'sum'; allowed: min, mean"),
        ({"var": "final_loss", "keep": ["lr"]}, "no axis 'lr'"),
        ({"var": "status", "reduce": "min"}, "reduce applies to numeric variables"),
    ],
)
def test_query_rejects_bad_input_naming_allowed_values(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        query(_hand_database(), **kwargs)
    assert fragment in str(err.value)


@pytest.mark.parametrize("study", list(STUDIES))
def test_synthetic_database_is_valid_and_consistent(study, tmp_path):
    ds = synthetic_database(study, seed=3)
    validate_database(ds)
    spec = STUDIES[study]
    assert list(ds["stage"].values) == list(spec.stages)
    for axis in spec.axes:
        assert axis in ds.dims
    ok = ds["status"] == "ok"
    assert int(ok.sum()) > 0 and int((ds["status"] == "failed").sum()) == 1
    final, hist = ds["final_loss"], ds["history_loss"]
    # final is (here) the history's last epoch; NaN exactly where no ok run
    np.testing.assert_allclose(final.where(ok), hist.isel(epoch=-1).where(ok))
    assert bool(final.where(~ok).isnull().all())
    # every final value is on the test images, every history on the validation images
    assert {ds[f"final_{m}"].attrs["split"] for m in ("loss", "dice", "iou")} == {"test"}
    assert {ds[f"history_{m}"].attrs["split"] for m in ("loss", "dice", "iou")} == {"validation"}
    # both scores lie in [0, 1]
    assert bool(((ds["final_iou"] <= ds["final_dice"]) | ds["final_iou"].isnull()).all())
    # deterministic in the seed
    xr.testing.assert_equal(ds, synthetic_database(study, seed=3))
    # round trip through netCDF keeps coordinates, attrs and every value; the metrics to 1e-4
    path = save_database(ds, tmp_path / f"{study}.nc")
    back = load_database(path, study=study)
    xr.testing.assert_equal(back.coords.to_dataset(), ds.coords.to_dataset())
    for var in ds.data_vars:
        if var in METRIC_VARS:
            np.testing.assert_allclose(back[var].values, ds[var].values, rtol=0, atol=1e-4)
            assert not np.array_equal(back[var].values, ds[var].values, equal_nan=True)
        else:
            xr.testing.assert_equal(back[var], ds[var])
    assert back.attrs["profile"] == "synthetic" and back.attrs["study"] == study


def test_load_from_profile_folder_and_study(tmp_path):
    save_database(synthetic_database("dose"), tmp_path / "dose.nc")
    assert load_database(tmp_path, study="dose").attrs["study"] == "dose"


def test_missing_database_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_database(tmp_path / "laptop" / "defocus.nc")
    msg = str(err.value)
    assert "defocus.nc" in msg and "hrtem-book sweep --study defocus --profile laptop" in msg


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    path = save_database(synthetic_database("defocus"), tmp_path / "defocus.nc")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"defocus\.nc is not a readable results database"):
        load_database(path)
    path.write_bytes(b"\x00not netcdf" * 100)
    with pytest.raises(ValueError, match=r"defocus\.nc is not a readable results database"):
        load_database(path)


def _write_raw(ds: xr.Dataset, path) -> None:
    ds.to_netcdf(path, engine="netcdf4")  # bypasses save_database's validation


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda ds: ds.drop_vars("history_loss"), "variable 'history_loss' missing"),
        (lambda ds: ds.drop_vars("final_dice"), "variable 'final_dice' missing"),
        (lambda ds: ds.isel(seed=0, drop=True), "dims"),
        (lambda ds: ds.rename({"freeze": "frozen"}), "dims"),
        (lambda ds: ds.assign_attrs(study="mystery"), "study='mystery' is unknown"),
        (lambda ds: ds.assign_attrs(schema_version=0), "schema_version=0"),
        (lambda ds: ds.drop_attrs(deep=False), "attrs"),
        (
            lambda ds: ds.assign(status=ds["status"].where(ds["status"] != "ok", "great")),
            "status values ['great']",
        ),  # fmt: skip
        (lambda ds: ds.assign(final_loss=ds["final_loss"].mean("stage")), "'final_loss' has dims"),
        (lambda ds: ds.assign(final_loss=-ds["final_loss"]), "'final_loss' holds values outside"),
        (lambda ds: ds.assign(final_dice=ds["final_dice"] + 1), "'final_dice' holds values"),
        (
            lambda ds: ds.assign(stop_reason=ds["stop_reason"].where(False, "tired")),
            "stop_reason values ['tired']",
        ),  # fmt: skip
    ],
)
def test_mismatched_schema_is_a_clear_error(mutate, fragment, tmp_path):
    path = tmp_path / "dose.nc"
    _write_raw(mutate(synthetic_database("dose")), path)
    with pytest.raises(ValueError) as err:
        load_database(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_wrong_study_is_rejected(tmp_path):
    path = save_database(synthetic_database("dose"), tmp_path / "x.nc")
    with pytest.raises(ValueError, match="holds study 'dose', expected 'structure'"):
        load_database(path, study="structure")
