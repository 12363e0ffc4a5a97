"""Shared analysis of the results databases: what every study's rules, views and figures read.

The error scale (the loss, or 1 − Dice / 1 − IoU: lower is better, so a difference of logs is a
relative change), a model's error after a stage, seed reduction and spread across an axis, the
gap of a model to the in-domain ideal (the model trained on the test domain itself) and the
(train, test) table of models trained without transfer. A study module (:mod:`hrtem_book.studies`)
builds its rules and views from these; nothing here knows a study.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._lazy import LazyModule
from .database import metric_var, query
from .evidence import NotMeasurable
from .metrics import get_metric
from .series import match_index

xr = LazyModule("xarray")  # imported on first use (hrtem_book._lazy)

ERROR_FLOOR = 1e-4  # errors below this (a perfect Dice) count as this, so logs stay finite


@contextlib.contextmanager
def quiet():
    """All-NaN groups give NaN by design: no RuntimeWarning about them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def error(da: xr.DataArray, metric: str) -> xr.DataArray:
    """The metric on a lower-is-better scale: the loss, or 1 − Dice / 1 − IoU."""
    return get_metric(metric).error(da)


def value(error: float, metric: str) -> float:
    """Back from the error scale to the metric."""
    return get_metric(metric).value(error)


def final_error(ds: xr.Dataset, stage: str, metric: str) -> xr.DataArray:
    """Error of every model after ``stage``: grid dims + ``eval_domain``."""
    da = ds[metric_var(metric, "final")].sel(stage=stage, drop=True)
    return error(da, metric)


def log_error(da: xr.DataArray) -> xr.DataArray:
    """Log of an error, floored at :data:`ERROR_FLOOR`."""
    return np.log(da.clip(min=ERROR_FLOOR))


def log_final(ds: xr.Dataset, stage: str, metric: str) -> xr.DataArray:
    """Log error of every model after ``stage``."""
    return log_error(final_error(ds, stage, metric))


def per_seed(da: xr.DataArray) -> xr.DataArray:
    """Mean over every dim but ``seed`` (NaN-aware): one value per seed."""
    dims = [d for d in da.dims if d != "seed"]
    with quiet():
        return da.mean(dims, skipna=True) if dims else da


def spread(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Log of the sample sd (ddof 1) across ``dim``: a relative spread, NaN with < 2 values."""
    with quiet():
        return np.log(da.std(dim, ddof=1, skipna=True).where(da.count(dim) >= 2))


def study_db(dbs: Mapping[str, xr.Dataset], name: str) -> xr.Dataset:
    """The ``name`` database of ``dbs``, with two or more seeds (else :class:`NotMeasurable`)."""
    ds = dbs.get(name)
    if ds is None:
        raise NotMeasurable(f"no {name} database")
    if ds.sizes.get("seed", 0) < 2:
        raise NotMeasurable(f"two or more seeds needed (the {name} database has one)")
    return ds


def domain_name(domain) -> str:
    """A domain as a rule's text names it: ``-10``, ``CdSe-small``."""
    return f"{domain:g}" if isinstance(domain, int | float) else str(domain)


def axis_spreads(table: xr.DataArray, a: str, b: str) -> xr.DataArray:
    """Per seed: spread across ``a`` of the means over ``b``, minus spread across ``b`` of the
    means over ``a`` (log sds): positive when ``a`` moves the error more."""
    rest = [d for d in table.dims if d not in (a, b, "seed")]
    with quiet():
        t = table.mean(rest, skipna=True) if rest else table
        return spread(t.mean(b, skipna=True), a) - spread(t.mean(a, skipna=True), b)


def in_domain_ideal(da: xr.DataArray, test_dim: str = "eval_domain") -> xr.DataArray:
    """Per test domain (along ``test_dim``), the value of the models trained on that domain
    itself (``train_domain`` equal to it): the in-domain ideal, the diagonal of the companion's
    tables; NaN where no model trained on the test domain. Other dims (seed) are kept."""
    trains = da["train_domain"].values
    idx = np.array([match_index(trains, t) for t in da[test_dim].values.tolist()])
    take = xr.DataArray(np.clip(idx, 0, None), dims=test_dim)
    ideal = da.isel(train_domain=take).drop_vars("train_domain")
    return ideal.where(xr.DataArray(idx >= 0, dims=test_dim))


def gaps(ds: xr.Dataset, metric: str) -> dict[tuple, xr.DataArray]:
    """Per (training, test) pair of distinct domains that are both trained and tested: the log
    error on ``test`` of the models trained on ``training`` minus that of the models trained on
    ``test`` itself (:func:`in_domain_ideal`), per seed."""
    err = log_final(ds, "pretrain", metric)  # train_domain, seed, eval_domain
    above = err - in_domain_ideal(err)
    trains = ds["train_domain"].values.tolist()
    tests = err["eval_domain"].values
    out = {}
    for u in trains:
        j = match_index(tests, u)
        if j < 0:
            continue
        for t in trains:
            if t != u:
                out[(t, u)] = above.sel(train_domain=t).isel(eval_domain=j)
    return out


def mean_gap(ds: xr.Dataset, metric: str) -> np.ndarray:
    """Per seed: the mean of :func:`gaps` over every pair."""
    found = gaps(ds, metric)
    if not found:
        raise NotMeasurable("two or more domains trained and tested needed")
    with quiet():
        return xr.concat(list(found.values()), "pair").mean("pair", skipna=True).values


def median(da: xr.DataArray, keep: list[str] | tuple[str, ...] = ()) -> xr.DataArray:
    """Median over every dim not in ``keep`` (NaN-aware)."""
    dims = [d for d in da.dims if d not in keep]
    with quiet():
        return da.median(dims, skipna=True) if dims else da


def seed_sd(table: xr.DataArray) -> float:
    """Median over the other cells of the seed-to-seed sample standard deviation (ddof 1)."""
    with quiet():
        sds = table.std("seed", skipna=True, ddof=1).values
    sds = sds[np.isfinite(sds)]
    return float(np.median(sds)) if sds.size else math.nan


def generalization_matrix(
    ds: xr.Dataset,
    metric: str = "dice",
    select: Mapping[str, Any] | None = None,
    reduce: str = "median",
) -> xr.DataArray:
    """The (train_domain, test_domain) table of a ``generalization-<series>`` database: the
    ``metric`` of the model each pretraining kept, trained on the row's domain and evaluated on
    the column's, reduced (``reduce``) over the seeds and any other selected cells. Its diagonal
    — trained and tested on one domain — is the in-domain ideal of the companion study."""
    if "train_domain" not in ds.dims:
        raise ValueError(
            f"study {ds.attrs.get('study')!r} has no train_domain axis; allowed: the "
            "generalization-<series> databases"
        )
    da = query(
        ds,
        metric_var(metric, "final"),
        {**dict(select or {}), "stage": "pretrain"},
        reduce,
        keep=["train_domain", "eval_domain"],
    )
    return da.rename(eval_domain="test_domain")


def deviation_from_ideal(matrix: xr.DataArray) -> xr.DataArray:
    """Each cell of a :func:`generalization_matrix` minus the cell on its column's diagonal
    (:func:`in_domain_ideal`: the model trained on the test domain itself); NaN for a test
    domain no model trained on. For Dice a negative deviation is a loss of overlap against the
    ideal."""
    return matrix - in_domain_ideal(matrix, "test_domain")
