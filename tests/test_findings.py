"""The findings' rules as statistical tests: their error rates measured by simulation (false-pass
≤ 5 % with no effect; power ≥ 80 % with the smallest claimed effect, or else a false-fail rate
≤ 5 %, so that an underpowered rule answers "inconclusive" rather than "does not hold"), the
decision table, the rule-set stamp, and the sources each claim cites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from hrtem_book import evidence, findings, power, studies
from hrtem_book.profiles import get_profile
from hrtem_book.studies import STUDY_NAMES, build_grid, generalization

SEEDS_DIR = Path(__file__).resolve().parents[2] / "shared" / "seeds"
# claims of the published study whose sentence is not among the excerpts in ../shared/seeds
UNCITED = {"F3", "F4"}


def _above_five_percent(rate: float, n_draws: int) -> bool:
    """Whether a false-pass rate measured on ``n_draws`` draws shows a true rate above 5 %: the
    one-sided binomial test at the 1 % level. A rule whose level is 5 % by construction (one
    two-sided contrast, as D1) measures 5 % ± 0.7 % on 1,000 draws: the bound is the true
    rate, the test allows for the simulation's own sampling error and nothing more."""
    k = round(rate * n_draws)
    return stats.binomtest(k, n_draws, 0.05, alternative="greater").pvalue < 0.01


@pytest.mark.parametrize("key", findings.RULE_KEYS)
def test_error_rates_by_simulation_on_the_laptop_grid(key):
    # seeds and test images as the two sampling units, as the build's databases are scored
    r = power.error_rates(key, "laptop", n_draws=1000)
    assert r.n_seeds == 3
    assert not _above_five_percent(r.false_pass, r.n_draws), r
    # power to see the smallest claimed effect, or an honest "inconclusive" where it lacks
    assert r.power >= 0.80 or r.false_fail <= 0.05, r


def _simulated(key: str, profile: str, scale: float, n_draws: int = 1, seed: int = 1) -> dict:
    rule = findings.get_rule(key)
    grids = {s: build_grid(s, get_profile(profile)) for s in rule.studies}
    nulls, alternative = studies.scenarios(key, {s: g.coords for s, g in grids.items()})
    rng = np.random.default_rng(seed)
    scenario = alternative if scale else nulls[0]
    return power.simulate_rule(grids, scenario, n_draws, rng, scale or 1.0)


# rules whose contrasts change sign with the effect (the others compare spreads)
SIGNED = ("F1", "F3", "F7", "F9", "G1", "G2", "G3", "G5", "G6")


# rules with a contrast that must be shown small (F3's decoder cost, F6's equivalence): three
# seeds rarely give an interval that narrow, whatever the size of their other contrasts
SMALL_PART = ("F3", "F6")


@pytest.mark.parametrize("key", [k for k in findings.RULE_KEYS if k != "F6"])
def test_a_large_effect_holds_and_its_reverse_does_not(key):
    big = findings.evaluate(_simulated(key, "laptop", 30.0))[key]
    assert big.intervals and all(t.n_seeds == 3 for t in big.intervals)
    if key not in SMALL_PART:
        assert big.verdict == evidence.HOLDS, big.summary
    if key in SIGNED:
        reverse = findings.evaluate(_simulated(key, "laptop", -30.0))[key]
        assert reverse.verdict == evidence.FAILS, reverse.summary


def test_dynamics_rules_relate_the_first_epoch_at_home_either_way():
    """D1 and D2: a planted rank correlation holds whichever its sign (the claim says related,
    not how); the first epoch is read on the model's own domain; seeds are the only unit."""
    for scale in (30.0, -30.0):
        f = findings.evaluate(_simulated("D1", "laptop", scale))["D1"]
        (t,) = f.intervals
        assert f.verdict == evidence.HOLDS and t.scale == "correlation", f.summary
        assert (t.estimate > 0) == (scale > 0) and t.images == 0
        assert "ρ = " in f.summary and "interval over seeds —" in f.summary
    dbs = _simulated("D2", "laptop", 30.0)
    table = generalization.first_epoch_table(dbs, "loss")
    ds, row = dbs["generalization-structure"], table["generalization-structure"]
    assert len(row["trains"]) == 4
    home = row["trains"][2]
    want = ds["history_loss"].sel(train_domain=home, eval_domain=home, stage="pretrain", epoch=1)
    assert np.allclose(row["early"][2], np.log(want.values))
    kept = ds["final_loss"].sel(train_domain=home, eval_domain=home, stage="pretrain")
    assert np.allclose(row["own"][2], np.log(kept.values))
    # fewer models than a rank correlation needs, or no variation: no value
    assert np.isnan(evidence.rank_z(np.ones((3, 2)), np.arange(6.0).reshape(3, 2))).all()
    x = np.arange(8.0).reshape(4, 2)
    assert np.allclose(evidence.rank_z(x, x), np.arctanh(0.999))
    # the vectorised ranks are scipy's Spearman, ties and missing models included
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 5, (9, 40)).astype(float), rng.normal(size=(9, 40))
    a[rng.random(a.shape) < 0.1] = np.nan
    want = []
    for s in range(40):
        ok = np.isfinite(a[:, s]) & np.isfinite(b[:, s])
        rho = stats.spearmanr(a[ok, s], b[ok, s]).statistic if ok.sum() >= 4 else np.nan
        want.append(np.arctanh(np.clip(rho, -0.999, 0.999)))
    assert np.allclose(evidence.rank_z(a, b), want, equal_nan=True)


def test_f6_equivalence_fails_with_a_large_difference():
    rule = findings.get_rule("F6")
    grids = {s: build_grid(s, get_profile("laptop")) for s in rule.studies}
    rng = np.random.default_rng(3)

    def mixture_worse(cell, st, ev, d):
        return 10 * d * (st == "mixture")

    dbs = {s: power.simulate(s, g.coords, g.eval_domains, mixture_worse, 1, rng)
           for s, g in grids.items()}  # fmt: skip
    assert findings.evaluate(dbs)["F6"].verdict == evidence.FAILS


def test_one_seed_is_not_measurable():
    """The smoke profile trains one seed: no interval, so no verdict."""
    for key in findings.RULE_KEYS:
        f = findings.evaluate(_simulated(key, "smoke", 30.0))[key]
        assert f.verdict == evidence.UNMEASURABLE, (key, f.summary)
        assert "seed" in f.summary


@pytest.mark.parametrize(
    ("kind", "low", "high", "verdict"),
    [
        ("greater", 0.01, 0.5, evidence.HOLDS),
        ("greater", -0.3, 0.05, evidence.FAILS),  # a 10 % effect is excluded
        ("greater", -0.1, 0.3, evidence.INCONCLUSIVE),
        ("below", -0.2, 0.05, evidence.HOLDS),
        ("below", 0.2, 0.5, evidence.FAILS),
        ("below", 0.0, 0.2, evidence.INCONCLUSIVE),
        ("within", -0.05, 0.05, evidence.HOLDS),
        ("within", 0.2, 0.4, evidence.FAILS),
        ("within", -0.2, 0.05, evidence.INCONCLUSIVE),
        ("differs", -0.4, -0.1, evidence.HOLDS),
        ("differs", -0.05, 0.05, evidence.FAILS),
        ("differs", -0.2, 0.3, evidence.INCONCLUSIVE),
    ],
)
def test_decision_table(kind, low, high, verdict):
    assert evidence.decide(kind, low, high) == verdict


def test_combined_verdicts_hold_only_when_every_contrast_holds():
    H, F, I = evidence.HOLDS, evidence.FAILS, evidence.INCONCLUSIVE  # noqa: E741
    assert evidence.combine([H, H]) == H
    assert evidence.combine([H, I]) == I
    assert evidence.combine([H, I, F]) == F
    with pytest.raises(ValueError, match="kind='most'; allowed: greater, below, within, differs"):
        evidence.decide("most", 0.0, 1.0)


def test_the_interval_is_the_student_t_interval_of_the_seed_mean():
    v = np.array([0.12, 0.05, 0.2])
    mean, low, high = evidence.t_interval(np.append(v, np.nan))  # NaN: a seed without the pair
    half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / np.sqrt(3)
    assert mean == pytest.approx(v.mean())
    assert (low, high) == pytest.approx((v.mean() - half, v.mean() + half))
    assert evidence.pct_change(np.log(1.1)) == "+10 %"
    assert np.isnan(evidence.t_interval(np.array([0.1]))[1])


def test_two_level_interval_adds_the_images_variance():
    rows = np.array([[0.12, 0.05, 0.2], [0.3, 0.3, 0.3]])
    # no image variance: the Student-t interval of the seed mean
    got = evidence.two_level_intervals(rows, 0.0, 16)
    want = evidence.t_intervals(rows)
    assert np.allclose(got, want)
    # images only (seeds agree): t with n_images - 1 degrees of freedom
    mean, low, high = evidence.two_level_intervals(rows[1:], 0.01, 16)
    assert high[0] - mean[0] == pytest.approx(stats.t.ppf(0.975, 15) * 0.1)
    # both: wider than either alone, Welch-Satterthwaite degrees of freedom
    a, v = rows[0].var(ddof=1) / 3, 0.004
    df = (a + v) ** 2 / (a**2 / 2 + v**2 / 15)
    mean, low, high = evidence.two_level_intervals(rows[:1], v, 16)
    assert high[0] - mean[0] == pytest.approx(stats.t.ppf(0.975, df) * np.sqrt(a + v))


def test_test_images_are_a_unit_only_where_contrasts_compare_different_images():
    """The bootstrap over test images (scipy.stats.bootstrap, each domain's images resampled
    apart, identically for every model scored on them): a contrast between two evaluation
    domains takes their sampling error (F1: ≈ √2 × spread/√16 per unit of log spread), a
    contrast on the same images (F3, F7) none; without image spread nothing changes."""
    from hrtem_book.testing import with_test_images

    g = build_grid("defocus", get_profile("laptop"))
    ds = power.simulate("defocus", g.coords, g.eval_domains, evidence.no_plant, 1,
                        np.random.default_rng(1))  # fmt: skip
    flat = findings.image_variances({"defocus": with_test_images(ds, 16, 0.0)})
    assert flat and all(v[0] < 1e-20 and v[1] == 16 for v in flat.values())
    spread = findings.image_variances({"defocus": with_test_images(ds, 16, 0.3)})
    theory = np.sqrt(2) * 0.3 / 4  # two domains' log means of 16 images
    for name in ("0 nm against -10 nm", "0 nm against 10 nm"):
        assert np.sqrt(spread[("F1", name)][0]) == pytest.approx(theory, rel=0.35)
    for key in ("F3", "F7"):
        assert all(v[0] < 1e-12 for (k, _), v in spread.items() if k == key)
    seeds_only = findings.evaluate({"defocus": ds})["F1"].intervals
    both = findings.evaluate({"defocus": with_test_images(ds, 16, 0.3)})["F1"].intervals
    for a, b in zip(seeds_only, both, strict=True):
        assert a.images == 0 and b.images == 16 and a.estimate == pytest.approx(b.estimate)
        assert b.high - b.low > a.high - a.low


def test_the_image_bootstrap_is_cached_beside_the_databases(tmp_path):
    """Chapters read the bootstrap once per build: a cache keyed by what it depends on, remade
    for other databases, and moved aside (one line) when unreadable."""
    from hrtem_book.testing import with_test_images

    g = build_grid("defocus", get_profile("laptop"))
    ds = power.simulate("defocus", g.coords, g.eval_domains, evidence.no_plant, 1,
                        np.random.default_rng(1))  # fmt: skip
    dbs = {"defocus": with_test_images(ds, 16, 0.3)}
    path, lines = tmp_path / ".cache-x.json", []
    first = findings.cached_image_variances(dbs, "loss", path, lines.append)
    assert path.is_file() and first == findings.image_variances(dbs, "loss")
    assert findings.cached_image_variances(dbs, "loss", path, lines.append) == first
    other = {"defocus": with_test_images(ds, 16, 0.6)}
    assert findings.cached_image_variances(other, "loss", path, lines.append) != first
    path.write_text("{not json")
    assert findings.cached_image_variances(dbs, "loss", path, lines.append) == first
    assert len(lines) == 1 and "is unreadable; moved aside" in lines[0]
    assert len(list(tmp_path.glob(".cache-x.json.invalid-*"))) == 1


def test_the_error_rate_table_is_cached_for_the_chapter(tmp_path, monkeypatch):
    path, lines = tmp_path / ".cache-power.json", []
    first = power.cached_table("smoke", path, lines.append)  # one seed: no interval, NaN
    assert set(first) == set(findings.RULE_KEYS) and path.is_file()
    monkeypatch.setattr(power, "table", lambda profile: pytest.fail("not read from the cache"))
    assert power.cached_table("smoke", path, lines.append).keys() == first.keys()
    path.write_text("[1, 2")
    monkeypatch.undo()
    assert power.cached_table("smoke", path, lines.append).keys() == first.keys()
    assert len(lines) == 1 and "is unreadable; moved aside" in lines[0]


def test_rule_set_hash_is_recorded_and_stamped():
    # a change of any rule (text, constants or code) changes the hash: record it, with its date,
    # in its own commit (findings.RULESET_SHA, findings.RULESET_DATE)
    assert findings.ruleset_sha() == findings.RULESET_SHA
    dbs = _simulated("G6", "laptop", 30.0)
    assert dbs["heldout"].attrs[findings.RULESET_ATTR] == findings.RULESET_SHA
    assert findings.evaluate(dbs)["G6"].verdict == evidence.HOLDS
    dbs["heldout"].attrs[findings.RULESET_ATTR] = "0123456789abcdef"
    old = findings.evaluate(dbs)["G6"]
    assert old.verdict == evidence.STALE
    assert "heldout (stamp 0123456789abcdef)" in old.summary and "hrtem-book collect" in old.summary


def test_every_finding_reports_a_verdict_and_its_rule():
    out = findings.evaluate({})
    assert list(out) == [f"F{i}" for i in range(1, 10)] + [f"G{i}" for i in range(1, 7)] + [
        "D1",
        "D2",
    ]
    for f in out.values():
        assert f.verdict == evidence.UNMEASURABLE and f.rule and f.claim
    with pytest.raises(ValueError, match="metric='accuracy'; allowed: loss, dice, iou"):
        findings.evaluate({}, metric="accuracy")


def test_failed_runs_are_skipped_not_counted():
    dbs = _simulated("F1", "laptop", 30.0)
    ds = dbs["defocus"]
    ds["final_loss"].loc[{"target_domain": 0.0, "seed": 0, "freeze": "none"}] = np.nan
    f = findings.evaluate(dbs)["F1"]
    assert f.verdict == evidence.HOLDS and f.intervals[0].n_seeds == 3


@pytest.mark.skipif(not SEEDS_DIR.is_dir(), reason="../shared/seeds not beside the checkout")
def test_every_claim_cites_a_sentence_of_its_source():
    texts = {p.name[:3]: " ".join(p.read_text().split()) for p in SEEDS_DIR.glob("0*.txt")}
    for rule in findings.RULES:
        seed, locator = rule.source
        if rule.key in UNCITED:
            assert rule.source == ("", "")
            continue
        assert locator and locator in texts[seed], rule.key


def test_findings_read_only_the_test_split():
    """Every verdict comes from the kept models' test-split scores (``final_<metric>``): with
    every other variable dropped, each finding says exactly what it said before — except the
    dynamics rules (D1, D2), whose predictor is each model's validation score after its first
    epoch and which read nothing else of the histories."""
    from hrtem_book.database import METRIC_SPLITS
    from hrtem_book.testing import synthetic_database

    assert METRIC_SPLITS["final"] == "test"
    dynamics = [k for k in findings.RULE_KEYS if findings.get_rule(k).scale == "correlation"]
    assert dynamics == ["D1", "D2"]
    dbs = {s: synthetic_database(s) for s in STUDY_NAMES}

    def keep(prefixes: tuple[str, ...]) -> dict:
        return {
            s: ds.drop_vars([v for v in ds.data_vars if not v.startswith(prefixes)])
            for s, ds in dbs.items()
        }

    bare = keep(("final_",))
    first = {
        s: ds.sel(epoch=[generalization.EARLY_EPOCH])
        for s, ds in keep(("final_", "history_")).items()
    }
    for metric in ("loss", "dice"):
        full = findings.evaluate(dbs, metric)
        only, with_first = findings.evaluate(bare, metric), findings.evaluate(first, metric)
        assert {k: f.summary for k, f in full.items()} == {
            k: f.summary for k, f in with_first.items()
        }
        for key, f in full.items():
            if key in dynamics:
                assert only[key].verdict == evidence.UNMEASURABLE
                assert "no per-epoch scores" in only[key].summary
            else:
                assert f.summary == only[key].summary
