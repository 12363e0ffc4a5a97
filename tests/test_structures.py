"""Structures: lattices against their crystallography, particle geometry and stacking faults,
amorphous carbon packing, scene assembly and determinism."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
from ase.data import atomic_numbers
from scipy.spatial import cKDTree

from hrtem_book import structures as S
from hrtem_book.config import SimulationConfig
from hrtem_book.profiles import PROFILES

# nearest-neighbour distance of each lattice kind from its geometry [Å]
NN_DISTANCE = {
    "fcc": lambda lat: lat.a_A / math.sqrt(2),
    "bcc": lambda lat: lat.a_A * math.sqrt(3) / 2,
    "diamond": lambda lat: lat.a_A * math.sqrt(3) / 4,
    # wurtzite: the shorter of the axial bond u·c and the three basal bonds
    "wurtzite": lambda lat: min(
        S.WURTZITE_U * lat.c_A, math.hypot(lat.a_A / math.sqrt(3), (0.5 - S.WURTZITE_U) * lat.c_A)
    ),
}
# atoms per conventional cell and the element ratio (metal : anion) of the formula
CELL_ATOMS = {"fcc": 4, "bcc": 2, "diamond": 8, "wurtzite": 4, "spinel": 56}
FORMULA = {"wurtzite": (1, 1), "spinel": (3, 4)}


def min_distance(positions: np.ndarray, boxsize=None) -> float:
    dist, _ = cKDTree(positions, boxsize=boxsize).query(positions, k=2)
    return float(dist[:, 1].min())


@pytest.mark.parametrize("name", list(S.LATTICES))
def test_bulk_lattice_constants_and_stoichiometry(name):
    lat = S.LATTICES[name]
    atoms = S.bulk_crystal(name)
    a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
    if lat.kind == "wurtzite":
        np.testing.assert_allclose(
            [a, b, c, alpha, beta, gamma], [lat.a_A, lat.a_A, lat.c_A, 90, 90, 120]
        )
    else:
        np.testing.assert_allclose([a, b, c, alpha, beta, gamma], [lat.a_A] * 3 + [90] * 3)
    assert len(atoms) == CELL_ATOMS[lat.kind]
    symbols = atoms.get_chemical_symbols()
    counts = tuple(symbols.count(s) for s in lat.species)
    ratio = FORMULA.get(lat.kind, (1,))
    assert counts[0] * ratio[-1] == counts[-1] * ratio[0]  # metal : anion as in the formula
    assert sum(counts) == len(atoms)
    assert lat.label_blur_A == (1.0 if name in ("C", "Fe", "Co3O4") else 1.6)


@pytest.mark.parametrize("name", [n for n, lat in S.LATTICES.items() if lat.kind != "spinel"])
def test_bulk_nearest_neighbour_distance(name):
    lat = S.LATTICES[name]
    atoms = S.bulk_crystal(name).repeat(3)
    d = atoms.get_all_distances(mic=True)
    np.testing.assert_allclose(d[d > 0].min(), NN_DISTANCE[lat.kind](lat), rtol=1e-6)


@pytest.mark.parametrize("name", ["Fe3O4", "Co3O4"])
def test_spinel_tetrahedral_bond(name):
    """Fd-3m origin 2: the 8a metal at (1/8,1/8,1/8) has four O at a·√3·(u − 1/8)."""
    lat = S.LATTICES[name]
    atoms = S.bulk_crystal(name)
    frac = atoms.get_scaled_positions()
    site_8a = np.flatnonzero(np.all(np.isclose(frac, 1 / 8), axis=1))
    assert len(site_8a) == 1
    oxygen = np.flatnonzero(atoms.numbers == 8)
    d = atoms.get_distances(site_8a[0], oxygen, mic=True)
    expected = lat.a_A * math.sqrt(3) * (S.SPINEL_U[name] - 1 / 8)
    np.testing.assert_allclose(np.sort(d)[:4], expected, rtol=1e-6)
    assert np.sort(d)[4] > expected + 0.5  # exactly four: a tetrahedron
    # measured Fe–O(tet) 1.89 Å in Fe3O4 (Fleet 1981), Co–O(tet) 1.93 Å in Co3O4 (Roth 1964)
    assert abs(expected - {"Fe3O4": 1.89, "Co3O4": 1.93}[name]) < 0.03


def test_unknown_lattice_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"'Au'.*ZnS, CdSe, Cu, Ag, C, Si, Fe3O4, Co3O4, Fe"):
        S.bulk_crystal("Au")
    with pytest.raises(ValueError, match="'Au'"):
        S.make_particle("Au", 10.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'Au'"):
        S.build_scene(PROFILES["smoke"].data.sim, "Au", (0.6, 0.8), np.random.default_rng(0))


@pytest.mark.parametrize("name", list(S.LATTICES))
def test_particle_is_a_sphere_of_the_bulk_crystal(name):
    radius = 15.0
    atoms = S.make_particle(name, radius, np.random.default_rng(1))
    r = np.linalg.norm(atoms.positions, axis=1)
    assert r.max() <= radius + 1e-9
    # a uniform ball has ⟨r²⟩ = 3/5 R² and an isotropic gyration tensor; a 15 Å cut of a lattice
    # (cells up to 8.4 Å, a few hundred atoms) deviates by its surface granularity, a few %
    np.testing.assert_allclose(np.mean(r**2), 0.6 * radius**2, rtol=0.06)
    gyr = np.linalg.eigvalsh(np.cov(atoms.positions.T))
    assert gyr.max() / gyr.min() < 1.15
    assert np.linalg.norm(atoms.positions.mean(0)) < 0.05 * radius
    # same shortest interatomic distance as the bulk: no duplicated or misplaced atoms
    bulk = S.bulk_crystal(name).repeat(2)
    bulk_nn = bulk.get_all_distances(mic=True)
    np.testing.assert_allclose(min_distance(atoms.positions), bulk_nn[bulk_nn > 0].min(), rtol=1e-6)
    # composition close to the formula (surface cuts change it by a few atoms only)
    lat = S.LATTICES[name]
    if lat.kind in FORMULA:
        m, x = (np.sum(atoms.numbers == atomic_numbers[s]) for s in lat.species)
        np.testing.assert_allclose(x / m, FORMULA[lat.kind][1] / FORMULA[lat.kind][0], rtol=0.1)


@pytest.mark.parametrize("name", ["Cu", "Fe", "Si", "Fe3O4"])
def test_particle_rotation_is_the_crystal_orientation(name):
    """Rotating back by the recorded rotation puts every atom on the cubic lattice again."""
    atoms = S.make_particle(name, 12.0, np.random.default_rng(7))
    rot = atoms.info["rotation"]
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(rot), 1.0)
    crystal_frame = atoms.positions @ rot  # inverse of positions = crystal @ rot.T
    bulk = S.bulk_crystal(name)
    a = S.LATTICES[name].a_A
    # every atom differs from the first by a vector of the crystal (lattice + basis differences)
    frac = (crystal_frame - crystal_frame[0]) / a
    basis_diff = (bulk.get_scaled_positions()[:, None] - bulk.get_scaled_positions()[None]).reshape(
        -1, 3
    )
    resid = (frac[:, None, :] - basis_diff[None]) % 1.0
    resid = np.minimum(resid, 1 - resid).max(axis=2).min(axis=1)
    assert resid.max() < 1e-9


def test_random_rotations_are_uniform():
    rng = np.random.default_rng(0)
    n = 4000
    mats = np.stack([S.random_rotation(rng) for _ in range(n)])
    # Haar measure on SO(3): every matrix element has mean 0 and variance 1/3
    assert np.abs(mats.mean(0)).max() < 5 * math.sqrt(1 / 3 / n)
    np.testing.assert_allclose(mats.var(0), 1 / 3, atol=0.03)


def test_orientation_differs_between_seeds():
    a = S.make_particle("CdSe", 12.0, np.random.default_rng(1))
    b = S.make_particle("CdSe", 12.0, np.random.default_rng(2))
    assert not np.allclose(a.info["rotation"], b.info["rotation"])
    c_axis_a, c_axis_b = a.info["rotation"][:, 2], b.info["rotation"][:, 2]
    assert abs(c_axis_a @ c_axis_b) < 0.999


def test_stacking_sequence_rules():
    assert S.stacking_sequence(8) == "ABABABAB"
    assert S.stacking_sequence(8, [4]) == "ABABCBCB"  # one I1 fault: one cubic triple B-A… → ABC
    assert S.count_cubic_steps("ABABCBCB") == 1
    assert S.count_cubic_steps(S.stacking_sequence(12, [4, 8])) == 2
    assert S.count_cubic_steps("ABCABC") == 4  # zinc blende: every triple is cubic
    with pytest.raises(ValueError, match="fault layers"):
        S.stacking_sequence(5, [7])


def stacking_from_geometry(atoms, name: str) -> str:
    """Stacking letters read from the atoms: cation planes along c in the crystal frame, each
    labelled by its lateral site (one of three close-packed sites) relative to the first atom."""
    lat = S.LATTICES[name]
    pos = (atoms.positions @ atoms.info["rotation"])[
        atoms.numbers == atomic_numbers[lat.species[0]]
    ]
    height = (pos[:, 2] - pos[:, 2].min()) / (lat.c_A / 2)
    layer = np.round(height).astype(int)
    assert np.abs(height - layer).max() < 1e-6  # cations sit on flat (0001) planes, c/2 apart
    hexagonal = np.array([[lat.a_A, 0.0], [-lat.a_A / 2, lat.a_A * math.sqrt(3) / 2]])
    frac = np.linalg.solve(hexagonal.T, (pos[:, :2] - pos[0, :2]).T).T
    assert np.allclose(3 * frac, np.round(3 * frac), atol=1e-6)  # on the three close-packed sites
    site = np.round(3 * frac[:, 0]).astype(int) % 3
    letters = []
    for k in range(layer.max() + 1):
        in_layer = np.unique(site[layer == k])
        assert len(in_layer) == 1  # one stacking position per plane
        letters.append("ABC"[in_layer[0]])
    return "".join(letters)


def test_wurtzite_faults_are_cubic_steps_in_the_atoms():
    counts = []
    for seed in range(24):
        atoms = S.make_particle("CdSe", 20.0, np.random.default_rng(seed), max_stacking_faults=2)
        n = atoms.info["n_faults"]
        counts.append(n)
        assert 0 <= n <= 2
        assert S.count_cubic_steps(atoms.info["stacking"]) == n
        geometric = stacking_from_geometry(atoms, "CdSe")
        assert S.count_cubic_steps(geometric) == n  # the fault is really in the atoms
    assert set(counts) == {0, 1, 2}  # the count is random over the whole range


def test_no_faults_when_not_asked_and_for_other_lattices():
    for seed in range(5):
        zns = S.make_particle("ZnS", 15.0, np.random.default_rng(seed), max_stacking_faults=0)
        assert zns.info["n_faults"] == 0
        assert S.count_cubic_steps(stacking_from_geometry(zns, "ZnS")) == 0
        assert S.make_particle("Cu", 10.0, np.random.default_rng(seed)).info["n_faults"] == 0


def test_amorphous_carbon_density_and_minimum_distance():
    L, T, rho, d = 40.0, 30.0, 2.0, 1.2
    carbon = S.amorphous_carbon(L, T, rho, d, np.random.default_rng(0))
    pos = carbon.positions
    assert np.all((pos[:, :2] >= 0) & (pos[:, :2] < L))
    assert np.all((pos[:, 2] >= 0) & (pos[:, 2] <= T))
    mass_g = len(carbon) * S.CARBON_MASS_G
    np.testing.assert_allclose(mass_g / (L * L * T * 1e-24), rho, rtol=1e-3)
    # minimum distance with periodic images in x, y (z not periodic: a box far longer than T)
    assert min_distance(pos, boxsize=[L, L, 10 * T]) >= d
    # the packing is not over-rejected: contacts just above the minimum distance exist
    assert min_distance(pos, boxsize=[L, L, 10 * T]) < d + 0.05
    # uniform: atoms per quarter of z and of x agree with N/4 within 5 Poisson σ
    n = len(carbon)
    for axis, size in ((2, T), (0, L)):
        per_bin = np.histogram(pos[:, axis], bins=4, range=(0, size))[0]
        assert np.all(np.abs(per_bin - n / 4) < 5 * math.sqrt(n / 4))


def test_amorphous_carbon_rejects_impossible_packing():
    with pytest.raises(ValueError, match="packing fraction"):
        S.amorphous_carbon(20.0, 10.0, 2.0, 2.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="thickness_A=-1"):
        S.amorphous_carbon(20.0, -1.0, 2.0, 1.2, np.random.default_rng(0))


def test_paper_scale_carbon_slab():
    """The largest slab of the paper (12.8 nm field, 8 nm thick); timed for the report only."""
    sim = PROFILES["paper"].data.sim
    L, T = sim.field_nm * 10, sim.carbon_thickness_nm[1] * 10
    t0 = time.perf_counter()
    carbon = S.amorphous_carbon(
        L, T, sim.carbon_density_g_cm3, sim.carbon_min_distance_A, np.random.default_rng(0)
    )
    elapsed = time.perf_counter() - t0
    print(f"paper-scale amorphous carbon: {len(carbon)} atoms in {elapsed:.2f} s")
    assert len(carbon) == S.carbon_atom_count(L * L, T, sim.carbon_density_g_cm3)
    assert min_distance(carbon.positions, boxsize=[L, L, 10 * T]) >= sim.carbon_min_distance_A


def check_scene(scene: S.Scene, sim: SimulationConfig, radius_range_nm) -> None:
    L = sim.field_nm * 10
    atoms, tags = scene.atoms, scene.atoms.get_tags()
    np.testing.assert_allclose(atoms.cell.lengths()[:2], [L, L])
    H = atoms.cell.lengths()[2]
    assert 1 <= len(scene.info) <= sim.particles_per_image[1]
    assert set(np.unique(tags)) == set(range(len(scene.info) + 1))
    carbon = atoms.positions[tags == 0]
    thickness = np.ptp(carbon[:, 2])
    t_lo, t_hi = sim.carbon_thickness_nm
    # the atoms span the drawn thickness T up to the empty margins at its faces (≪ 1 Å at
    # 0.1 atoms/Å³ over the field's area)
    assert t_lo * 10 - 1.0 <= thickness <= t_hi * 10
    assert carbon[:, 2].min() > 0 and atoms.positions[:, 2].max() < H  # vacuum below and above
    centers = np.array([p["center_A"] for p in scene.info])
    radii = np.array([p["radius_A"] for p in scene.info])
    assert np.all((radii >= radius_range_nm[0] * 10) & (radii <= radius_range_nm[1] * 10))
    for i, p in enumerate(scene.info, start=1):
        xyz = atoms.positions[tags == i]
        assert np.linalg.norm(xyz - p["center_A"], axis=1).max() <= p["radius_A"] + 1e-9
        assert np.all((xyz[:, :2] >= 0) & (xyz[:, :2] <= L))  # inside the field
        assert xyz[:, 2].min() > carbon[:, 2].max()  # resting on top of the slab
        assert 0 <= p["n_faults"] <= sim.max_stacking_faults
    gap = sim.particle_gap_nm * 10
    for i in range(len(radii)):
        for j in range(i):
            surface = np.linalg.norm(centers[i] - centers[j]) - radii[i] - radii[j]
            assert surface >= gap - 1e-9
    # the particles-in-vacuum structure is exactly the particle subset of the scene
    np.testing.assert_array_equal(scene.particles.positions, atoms.positions[tags > 0])
    np.testing.assert_array_equal(scene.particles.numbers, atoms.numbers[tags > 0])
    np.testing.assert_array_equal(scene.particles.cell.array, atoms.cell.array)


@pytest.mark.parametrize("profile", ["smoke", "laptop"])
def test_scene_geometry(profile):
    data = PROFILES[profile].data
    for seed in range(4):
        for lattice, radii in (("CdSe", data.large_radius_nm), ("Fe3O4", data.small_radius_nm)):
            scene = S.build_scene(data.sim, lattice, radii, np.random.default_rng(seed))
            check_scene(scene, data.sim, radii)


def test_scene_places_many_particles_with_gaps():
    sim = replace(PROFILES["laptop"].data.sim, particles_per_image=(5, 5), particle_gap_nm=1.0)
    scene = S.build_scene(sim, "Cu", (0.5, 0.6), np.random.default_rng(3))
    assert len(scene.info) == 5  # plenty of room: all five fit
    check_scene(scene, sim, (0.5, 0.6))


def test_crowded_scene_uses_fewer_particles():
    # 2 nm wide particles in a 3.2 nm field: centres lie in a 1.2 nm square, so two of them can
    # never be 2 nm + 0.5 nm apart; the placement gives up after bounded tries and keeps one
    sim = replace(PROFILES["smoke"].data.sim, particles_per_image=(5, 5))
    scene = S.build_scene(sim, "Ag", (1.0, 1.0), np.random.default_rng(0))
    assert len(scene.info) == 1
    check_scene(scene, sim, (1.0, 1.0))


def test_contamination_layer_covers_the_scene_and_changes_nothing_below():
    """A contamination layer (the experimental-like scenes'): amorphous carbon at the support's
    density, as many atoms as its volume holds, over the highest particle; its draws come last,
    so the particles and the support are those of the same scene without it."""
    base = replace(PROFILES["smoke"].data.sim, carbon_thickness_nm=(1.0, 1.0))
    plain = S.build_scene(base, "CdSe", (0.6, 0.8), np.random.default_rng(7))
    dirty_sim = replace(base, contamination_nm=(1.0, 1.0))
    dirty = S.build_scene(dirty_sim, "CdSe", (0.6, 0.8), np.random.default_rng(7))
    n = len(plain.atoms)
    np.testing.assert_array_equal(dirty.atoms.positions[:n], plain.atoms.positions)
    assert dirty.info == plain.info
    cover = dirty.atoms[n:]
    L = base.field_nm * 10
    assert set(cover.numbers) == {6} and set(cover.get_tags()) == {0}
    assert len(cover) == S.carbon_atom_count(L * L, 10.0, base.carbon_density_g_cm3)
    top = max(c["center_A"][2] + c["radius_A"] for c in plain.info)
    z = cover.positions[:, 2]
    assert z.min() >= top + base.carbon_min_distance_A - 1e-9
    assert z.max() <= top + base.carbon_min_distance_A + 10.0 + 1e-9
    assert dirty.atoms.cell[2][2] == pytest.approx(
        top + base.carbon_min_distance_A + 10.0 + S.VACUUM_A
    )
    with pytest.raises(ValueError, match=r"contamination_nm=\(2.0, 1.0\) must satisfy"):
        replace(base, contamination_nm=(2.0, 1.0))


def test_particle_too_large_for_field():
    sim = PROFILES["smoke"].data.sim
    with pytest.raises(ValueError, match=r"radius 2\.0 nm.*3\.2 nm field"):
        S.build_scene(sim, "Cu", (1.0, 2.0), np.random.default_rng(0))


def test_scene_is_deterministic():
    sim = PROFILES["smoke"].data.sim
    a = S.build_scene(sim, "ZnS", (0.6, 0.8), np.random.default_rng(5))
    b = S.build_scene(sim, "ZnS", (0.6, 0.8), np.random.default_rng(5))
    c = S.build_scene(sim, "ZnS", (0.6, 0.8), np.random.default_rng(6))
    np.testing.assert_array_equal(a.atoms.positions, b.atoms.positions)
    np.testing.assert_array_equal(a.atoms.numbers, b.atoms.numbers)
    assert a.info == b.info
    assert a.atoms.positions.shape != c.atoms.positions.shape or not np.array_equal(
        a.atoms.positions, c.atoms.positions
    )


def test_bad_geometry_inputs_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="radius_A=-1.0"):
        S.make_particle("Cu", -1.0, rng)
    with pytest.raises(ValueError, match=r"radius_range_nm=\(0.8, 0.6\)"):
        S.build_scene(PROFILES["smoke"].data.sim, "Cu", (0.8, 0.6), rng)
