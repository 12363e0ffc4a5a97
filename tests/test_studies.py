"""Study grids: the paper's counts, checkpoint sharing, mirrored baselines, profile shrinking."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from hrtem_book.config import MixtureConfig, TransferConfig, config_hash
from hrtem_book.profiles import PROFILES, get_profile
from hrtem_book.studies import STUDIES, build_grid, parse_mix


@pytest.fixture(scope="module")
def paper():
    return {study: build_grid(study, get_profile("paper")) for study in STUDIES}


def test_paper_grid_counts(paper):
    # 5 pretraining defoci × 10 targets × 4 N × 2 × 2 learning rates × 3 freeze × 3 seeds
    assert len(paper["defocus"].runs) == 5 * 10 * 4 * 2 * 2 * 3 * 3 == 7200
    assert len(paper["defocus"].pretrains) == 5 * 2 * 3 == 30
    # 40 unordered pairs touching a pretraining defocus × 3 mixtures × 2 LR × 3 seeds
    assert len(paper["baseline"].runs) == 40 * 3 * 2 * 3 == 720
    assert len(paper["baseline"].cells) == 5 * 10 * 3 * 2 * 3 == 900
    assert len(paper["dose"].runs) == 5 * 4 * 3 * 3 == 180
    assert len(paper["dose"].pretrains) == 5 * 3
    # 18 structure × size sets, ordered pairs; the paper's text rounds this to "about 2,500"
    assert len(paper["structure"].runs) == 18 * 17 * 3 * 3 == 2754
    assert len(paper["structure"].pretrains) == 18 * 3


def test_every_defocus_pretraining_serves_its_transfer_runs(paper):
    grid = paper["defocus"]
    uses = Counter(config_hash(cfg.pretrain) for cfg in grid.runs.values())
    assert set(uses) == set(grid.pretrains)
    assert set(uses.values()) == {7200 // 30}  # 10 targets × 4 N × 2 transfer LR × 3 freeze
    for cell, cfg in list(grid.cells.items())[:50]:
        v = dict(zip(grid.spec.axes, cell, strict=True))
        assert isinstance(cfg, TransferConfig)
        assert (cfg.pretrain.domain, cfg.pretrain.lr, cfg.seed) == (
            v["pretrain_domain"],
            v["pretrain_lr"],
            v["seed"],
        )
        assert (cfg.domain, cfg.n_train, cfg.lr, cfg.freeze) == (
            v["target_domain"],
            v["n_transfer"],
            v["transfer_lr"],
            v["freeze"],
        )
    # target = pretraining domain is excluded
    assert all(c[0] != c[1] for c in grid.cells)


def test_mirrored_baseline_cells_are_one_run(paper):
    grid = paper["baseline"]
    axes = grid.spec.axes
    for cell, cfg in grid.cells.items():
        v = dict(zip(axes, cell, strict=True))
        assert isinstance(cfg, MixtureConfig)
        n_a, n_b = parse_mix(v["mix"])
        assert dict(zip(cfg.domains, cfg.n_images, strict=True)) == {
            v["domain_a"]: n_a,
            v["domain_b"]: n_b,
        }
        if v["domain_b"] in grid.coords["domain_a"]:
            mirror = (v["domain_b"], v["domain_a"], f"{n_b}:{n_a}", v["lr"], v["seed"])
            if mirror in grid.cells:
                assert config_hash(grid.cells[mirror]) == config_hash(cfg)


def test_dose_and_structure_use_fixed_settings(paper):
    for study in ("dose", "structure"):
        grid = paper[study]
        assert grid.fixed == {"pretrain_lr": 1e-4, "transfer_lr": 1e-5, "n_transfer": 128}
        for cfg in grid.runs.values():
            assert (cfg.pretrain.lr, cfg.lr, cfg.n_train) == (1e-4, 1e-5, 128)
    assert "CdSe-small" in paper["structure"].coords["target_domain"]
    assert paper["dose"].eval_domains == (30.0, 75.0, 150.0, 300.0, 600.0)


@pytest.mark.parametrize("name", list(PROFILES))
def test_profiles_shrink_values_but_keep_every_axis(name, paper):
    profile = get_profile(name)
    for study, spec in STUDIES.items():
        grid = build_grid(study, profile)
        assert tuple(grid.coords) == tuple(paper[study].coords) == spec.axes
        assert all(len(v) >= 1 for v in grid.coords.values())
        assert 0 < len(grid.runs) <= len(paper[study].runs)
        # the laptop's steps are 8-64x fewer per epoch than the paper's: its learning rates may
        # go up (3e-3 from scratch, 3e-4 in transfer; profiles.py gives the measurements),
        # never its axes
        laptop = profile.data_name == "laptop"
        scaled = {"n_transfer", "mix"} | ({"transfer_lr", "pretrain_lr", "lr"} if laptop else set())
        for axis in set(spec.axes) - set(spec.domain_axes) - scaled:
            assert set(grid.coords[axis]) <= set(paper[study].coords[axis]), (study, axis)


def test_laptop_has_three_seeds_everywhere():
    """Three seeds in every study but the held-out one, which has two (a spread, at least):
    with three the laptop book took 20 min 18 s, over its 20-minute budget (README)."""
    for study in STUDIES:
        seeds = build_grid(study, get_profile("laptop")).coords["seed"]
        assert len(seeds) >= (2 if study == "heldout" else 3), study


def _with_studies(changes: dict):
    smoke = get_profile("smoke")
    studies = {k: {**v, **changes.get(k, {})} for k, v in smoke.studies.items()}
    return dataclasses.replace(smoke, studies=studies)


@pytest.mark.parametrize(
    "studies, fragment",
    [
        (
            {"defocus": {"defocus": (0.0,)}},
            "no axis or setting 'defocus'; allowed: pretrain_domain",
        ),
        ({"defocus": {"target_domain": (3.0,)}}, "values [3.0] are not domains"),
        ({"defocus": {"n_transfer": (999,)}}, "n_transfer=999 exceeds the 8 train images"),
        ({"defocus": {"seed": ()}}, "needs at least one value"),
        ({"defocus": {"seed": (0, 0)}}, "repeats values"),
        ({"baseline": {"mix": ("half",)}}, "mix='half' is not allowed"),
        ({"dose": {"freeze": ("all",)}}, "freeze='all'; allowed: none, encoder, decoder"),
        ({"structure": {"target_domain": ("Au-small",)}}, "not domains of the profile's"),
        ({"dose": {"n_transfer": (4, 8)}}, "n_transfer=(4, 8) is a fixed setting here"),
        ({"structure": {"pretrain_lr": "1e-3"}}, "pretrain_lr='1e-3' is a fixed setting"),
        ({"dose": {"n_transfer": 4.5}}, "allowed: one value, an integer"),
    ],
)
def test_bad_study_overrides_are_clear_errors(studies, fragment):
    with pytest.raises(ValueError) as err:
        build_grid(next(iter(studies)), _with_studies(studies))
    assert fragment in str(err.value)


def test_fixed_settings_take_the_type_of_their_axis():
    # 1 and 1.0 (or 4 and 4.0) are one setting: the same run configs, the same hashes
    as_float = build_grid("dose", _with_studies({"dose": {"pretrain_lr": 1.0, "n_transfer": 4}}))
    as_int = build_grid("dose", _with_studies({"dose": {"pretrain_lr": 1, "n_transfer": 4.0}}))
    assert list(as_int.runs) == list(as_float.runs)
    assert as_int.fixed["n_transfer"] == 4 and isinstance(as_int.fixed["n_transfer"], int)


def test_unknown_study_lists_allowed():
    with pytest.raises(ValueError, match="unknown study 'focus'; allowed: defocus, baseline"):
        build_grid("focus", get_profile("smoke"))
