"""Adding a study is one new module (docs/ARCHITECTURE.md, "Adding a study"): the study below is
defined here, registered, and goes sweep → database → finding → figure through the package as it
is — no other module edited."""

from __future__ import annotations

import types

import numpy as np
import pytest
import xarray as xr
from conftest import smoke_project
from matplotlib.figure import Figure

from hrtem_book import studies
from hrtem_book.analysis import log_final, per_seed, study_db
from hrtem_book.config import DataConfig
from hrtem_book.database import on_domain
from hrtem_book.evidence import KINDS, VERDICTS, Contrast, NotMeasurable, Rule
from hrtem_book.findings import collect, score
from hrtem_book.profiles import get_profile
from hrtem_book.results import load_database
from hrtem_book.studies.grid import PRETRAIN, StudySpec
from hrtem_book.sweep import run_sweep

SMOKE = get_profile("smoke")
NAME = "focus-pair"


def _make_module() -> types.ModuleType:
    """The study's module, as a researcher would write ``studies/focus_pair.py``."""
    mod = types.ModuleType("focus_pair")

    def paper(data: DataConfig, series: str) -> dict[str, tuple]:
        return {"train_domain": data.domains(series)[:2], "seed": (0, 1)}

    mod.SPECS = (
        StudySpec(
            name=NAME,
            series="defocus",
            kind=PRETRAIN,
            axes=("train_domain", "seed"),
            domain_axes=("train_domain",),
            paper=paper,
            # a rate of its own: its models are new runs, not the generalization study's
            fixed={"pretrain_lr": 2e-3},
            description="Two defoci, each model tested on both.",
        ),
    )

    def away_is_worse(dbs, metric):
        ds = study_db(dbs, NAME)
        err = log_final(ds, "pretrain", metric)  # train_domain, seed, eval_domain
        home = on_domain(err, "train_domain")
        a, b = ds["train_domain"].values.tolist()
        if err.sizes["eval_domain"] < 2:
            raise NotMeasurable("two evaluation domains needed")
        away = err.sel(train_domain=a).sel(eval_domain=b) - home.sel(train_domain=b)
        return [Contrast(f"{a:g} nm model on {b:g} nm against the home model", "greater",
                         per_seed(away).values)]  # fmt: skip

    mod.RULES = (
        Rule("T1", "a model is worse away from home", "A model trained on one defocus does "
             "worse on another than the model trained there.", ("", ""),
             "Per seed: the away model's error on the second defocus against the home model's.",
             away_is_worse, (NAME,)),
    )  # fmt: skip

    def loss_table(ds: xr.Dataset) -> Figure:
        fig = Figure(figsize=(3, 3))
        ax = fig.add_subplot()
        table = ds["final_loss"].sel(stage="pretrain").mean("seed")
        ax.imshow(table.values)
        ax.set_xlabel("test defocus [nm]")
        ax.set_ylabel("training defocus [nm]")
        return fig

    mod.FIGURES = {"loss_table": loss_table}
    return mod


@pytest.fixture
def new_study():
    mod = _make_module()
    rules = studies.RULES
    with studies.registered(mod):
        yield mod
    assert NAME not in studies.STUDIES and studies.RULES == rules  # the registry as it was


def test_a_study_defined_in_one_module_goes_sweep_database_finding_figure(
    new_study, tmp_path, smoke_data
):
    assert studies.expand_studies("all")[-1] == NAME
    root = smoke_project(tmp_path, smoke_data)
    summary = run_sweep(NAME, SMOKE, root, progress=False, log=lambda msg: None)
    assert summary.failed == summary.errors == 0, summary.failures
    assert summary.done == 4  # two defoci × two seeds, all new
    (path,) = collect(SMOKE, root, [NAME], log=lambda msg: None).values()
    ds = load_database(path, NAME)
    assert (ds["status"] == "ok").all()
    assert np.isfinite(ds["final_loss"]).all()
    (rule,) = new_study.RULES
    finding = score(rule, {NAME: ds}, "loss")
    assert finding.verdict in VERDICTS and finding.intervals, finding.summary
    assert finding.intervals[0].kind in KINDS and finding.intervals[0].n_seeds == 2
    fig = new_study.FIGURES["loss_table"](ds)
    assert fig.axes[0].get_ylabel() == "training defocus [nm]"


def test_a_study_name_or_rule_key_is_taken_once(new_study):
    clash = types.ModuleType("clash")
    clash.SPECS, clash.RULES = new_study.SPECS, ()
    with pytest.raises(ValueError, match="taken already"):
        studies.register(clash)
    clash.SPECS, clash.RULES = (), (studies.RULES[0],)
    with pytest.raises(ValueError, match="taken already"):
        studies.register(clash)
