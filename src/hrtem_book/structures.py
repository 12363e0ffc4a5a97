"""Atomic structures of the simulated scenes: crystals, nanoparticles, amorphous carbon, scenes.

All lengths are in Ångström (``_A``) unless the name says nanometre (``_nm``). The beam runs along
+z; a scene is a periodic (x, y) field of side L with an amorphous carbon slab at the bottom and
spherical nanoparticles resting on it.

Lattices and lattice constants are those of the paper (Rangel DaCosta, Oill & Scott, "Strategies
for effective transfer learning for HRTEM analysis with neural networks"): wurtzite ZnS and CdSe,
fcc Cu and Ag, diamond C and Si, spinel Fe3O4 and Co3O4, bcc Fe. Internal coordinates that the
paper does not give are taken from the crystallographic literature and cited where they are used.

Wurtzite particles are built layer by layer from close-packed (0001) bilayers so that stacking
faults can be placed on chosen planes (see :func:`stacking_sequence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ase
import ase.data
import numpy as np
from ase.build import bulk
from ase.spacegroup import crystal
from scipy.spatial import cKDTree

from .config import SimulationConfig

# --- lattices -------------------------------------------------------------------------------

WURTZITE_U = 3.0 / 8.0  # ideal wurtzite anion parameter; ZnS 0.375, CdSe 0.376 (within 0.01 Å)

# Spinel oxygen parameter u of Fd-3m, origin choice 2 (origin at the centre, -3m), 32e (u, u, u):
# Fe3O4 (inverse spinel) u = 0.2549, M. E. Fleet, Acta Cryst. B 37, 917 (1981);
# Co3O4 (normal spinel)  u = 0.2632, W. L. Roth, J. Phys. Chem. Solids 25, 1 (1964)
# (0.388 in origin choice 1). Normal and inverse spinel differ only in the cation valences on the
# 8a/16d sites, not in the species, so both use the same positions: metal on 8a and 16d, O on 32e.
SPINEL_U = {"Fe3O4": 0.2549, "Co3O4": 0.2632}


@dataclass(frozen=True)
class Lattice:
    """One of the nine crystal structures of the study.

    ``a_A``/``c_A``: lattice constants [Å] (``c_A`` only for the hexagonal wurtzite);
    ``label_blur_A``: σ of the Gaussian that smooths the particle mask [Å] (paper: 1 Å for C, Fe,
    Co3O4 and 1.6 Å for the others); ``species``: chemical symbols (cation first).
    """

    name: str
    kind: str  # "wurtzite", "fcc", "diamond", "spinel", "bcc"
    a_A: float
    c_A: float | None
    label_blur_A: float
    species: tuple[str, ...] = field(default=())


LATTICES: dict[str, Lattice] = {
    lat.name: lat
    for lat in (
        Lattice("ZnS", "wurtzite", 3.8227, 6.2607, 1.6, ("Zn", "S")),
        Lattice("CdSe", "wurtzite", 4.2985, 7.0152, 1.6, ("Cd", "Se")),
        Lattice("Cu", "fcc", 3.6157, None, 1.6, ("Cu",)),
        Lattice("Ag", "fcc", 4.0782, None, 1.6, ("Ag",)),
        Lattice("C", "diamond", 3.5673, None, 1.0, ("C",)),
        Lattice("Si", "diamond", 5.430, None, 1.6, ("Si",)),
        Lattice("Fe3O4", "spinel", 8.394, None, 1.6, ("Fe", "O")),
        Lattice("Co3O4", "spinel", 8.065, None, 1.0, ("Co", "O")),
        Lattice("Fe", "bcc", 2.866, None, 1.0, ("Fe",)),
    )
}


def get_lattice(name: str) -> Lattice:
    """The :class:`Lattice` called ``name``; a clear ValueError for an unknown name."""
    try:
        return LATTICES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown lattice {name!r}; allowed: {', '.join(LATTICES)}") from None


def bulk_crystal(name: str) -> ase.Atoms:
    """Conventional unit cell of lattice ``name`` (periodic, correct stoichiometry).

    Cells: wurtzite 4 atoms (P6_3mc, cation 2b (1/3, 2/3, 0), anion (1/3, 2/3, u)); fcc 4;
    diamond 8; bcc 2; spinel 56 (Fd-3m origin choice 2: metal 8a + 16d, O 32e).
    """
    lat = get_lattice(name)
    if lat.kind == "wurtzite":
        a, c = lat.a_A, lat.c_A
        return crystal(
            list(lat.species),
            basis=[(1 / 3, 2 / 3, 0.0), (1 / 3, 2 / 3, WURTZITE_U)],
            spacegroup=186,
            cellpar=[a, a, c, 90, 90, 120],
        )
    if lat.kind in ("fcc", "bcc", "diamond"):
        return bulk(lat.species[0], lat.kind, a=lat.a_A, cubic=True)
    if lat.kind == "spinel":
        u = SPINEL_U[name]
        metal, oxygen = lat.species
        return crystal(
            [metal, metal, oxygen],
            basis=[(1 / 8, 1 / 8, 1 / 8), (1 / 2, 1 / 2, 1 / 2), (u, u, u)],
            spacegroup=227,
            setting=2,
            cellpar=[lat.a_A] * 3 + [90] * 3,
        )
    raise AssertionError(f"lattice kind {lat.kind!r} has no builder")  # LATTICES is closed


# --- particles ------------------------------------------------------------------------------


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly (Haar measure) from SO(3).

    A normalised 4-vector of independent normal deviates is a uniform unit quaternion
    (Shoemake, Graphics Gems III, 1992), hence a uniform rotation.
    """
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _lattice_points_in_sphere(cell: np.ndarray, radius_A: float) -> np.ndarray:
    """Translations n1·a1 + n2·a2 + n3·a3 covering a sphere of ``radius_A`` around the origin.

    The number of repeats along a_i is set by the distance between the lattice planes spanned by the
    other two vectors, 1/|b_i| (b = reciprocal vectors without 2π), plus one cell of slack.
    """
    heights = 1.0 / np.linalg.norm(np.linalg.inv(cell).T, axis=1)
    n = np.ceil(radius_A / heights).astype(int) + 1
    grid = np.stack(
        np.meshgrid(*(np.arange(-k, k + 1) for k in n), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    return grid @ cell


def stacking_sequence(n_layers: int, fault_layers: list[int] | tuple[int, ...] = ()) -> str:
    """Stacking letters (A, B, C) of ``n_layers`` close-packed bilayers with intrinsic faults.

    Wurtzite is the hexagonal sequence ABAB…: each layer repeats the layer two below it. At a
    fault layer k the rule is broken once: layer k takes the third letter, so (k-2, k-1, k) is a
    cubic (zinc-blende) ABC step, and hexagonal stacking resumes from there (ABAB|CBCB…). This is
    the I1 intrinsic fault, the lowest-energy stacking fault of wurtzite semiconductors
    (Yeh, Lu, Froyen & Zunger, Phys. Rev. B 46, 10086 (1992)); each fault gives exactly one cubic
    triple, which is how faults are counted back (:func:`count_cubic_steps`).
    """
    faults = set(fault_layers)
    if any(not 2 <= k < n_layers for k in faults):
        raise ValueError(f"fault layers {sorted(faults)} must lie in 2..{n_layers - 1}")
    seq = ["A", "B"][:n_layers]
    for k in range(2, n_layers):
        if k in faults:
            seq.append(({"A", "B", "C"} - {seq[k - 1], seq[k - 2]}).pop())
        else:
            seq.append(seq[k - 2])
    return "".join(seq)


def count_cubic_steps(sequence: str) -> int:
    """Number of consecutive letter triples that are all different (cubic ABC steps)."""
    return sum(len(set(sequence[k - 2 : k + 1])) == 3 for k in range(2, len(sequence)))


# lateral positions of the close-packed sites in fractions of (a1, a2); A and B are the two
# sites of the wurtzite cell of bulk_crystal, so a fault-free particle is the bulk crystal
_SITE_FRACTIONS = {"A": (1 / 3, 2 / 3), "B": (2 / 3, 1 / 3), "C": (0.0, 0.0)}


def _wurtzite_cluster(
    lat: Lattice, radius_A: float, offset: np.ndarray, n_faults: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str, list[int]]:
    """Positions (crystal frame, sphere centre at the origin) and atomic numbers of a wurtzite
    sphere built from stacked (0001) bilayers, with ``n_faults`` I1 faults on random planes."""
    a, c = lat.a_A, lat.c_A
    spacing = c / 2  # bilayer spacing along c [Å]
    k_max = int(math.ceil((radius_A + c) / spacing)) + 1
    layer_idx = np.arange(-k_max, k_max + 1)
    layer_z = layer_idx * spacing - offset[2]  # cation plane heights relative to the centre
    # candidate fault layers k: the whole cubic triple (k-2, k-1, k) lies in the inner 80 % of
    # the sphere's height, so every fault is visible inside the particle
    inner = np.flatnonzero((layer_z - c >= -0.8 * radius_A) & (layer_z <= 0.8 * radius_A))
    n_faults = min(n_faults, len(inner))
    faults = sorted(rng.choice(inner, size=n_faults, replace=False).tolist()) if n_faults else []
    seq = stacking_sequence(len(layer_idx), faults)

    a1 = np.array([a, 0.0])
    a2 = np.array([-a / 2, a * math.sqrt(3) / 2])
    n_lat = int(math.ceil(radius_A / (a * math.sqrt(3) / 2))) + 3  # + offset + site
    ij = np.stack(np.meshgrid(np.arange(-n_lat, n_lat + 1), np.arange(-n_lat, n_lat + 1)), -1)
    plane = ij.reshape(-1, 2) @ np.stack([a1, a2]) - offset[:2]
    sites = {s: np.array(f) @ np.stack([a1, a2]) for s, f in _SITE_FRACTIONS.items()}
    z_cat, z_an = ase.data.atomic_numbers[lat.species[0]], ase.data.atomic_numbers[lat.species[1]]
    pos, num, layer = [], [], []
    for k, (letter, z0) in enumerate(zip(seq, layer_z, strict=True)):
        xy = plane + sites[letter]
        for dz, znum in ((0.0, z_cat), (WURTZITE_U * c, z_an)):
            pos.append(np.column_stack([xy, np.full(len(xy), z0 + dz)]))
            num.append(np.full(len(xy), znum))
            layer.append(np.full(len(xy), k))
    pos, num, layer = np.concatenate(pos), np.concatenate(num), np.concatenate(layer)
    keep = np.einsum("ij,ij->i", pos, pos) <= radius_A**2
    # report the stacking of the bilayers that hold atoms (a contiguous run of layers)
    lo, hi = layer[keep].min(), layer[keep].max()
    return pos[keep], num[keep], seq[lo : hi + 1], [int(k - lo) for k in faults]


def make_particle(
    name: str, radius_A: float, rng: np.random.Generator, max_stacking_faults: int = 2
) -> ase.Atoms:
    """A spherical nanoparticle of lattice ``name``, uniformly randomly oriented, centred at 0.

    The sphere (every atom within ``radius_A`` [Å] of the origin) is cut from the bulk crystal
    around a random point of the unit cell, so the particle's surface termination varies too.
    Wurtzite particles carry a uniform random number 0..``max_stacking_faults`` of I1 stacking
    faults on random (0001) planes (:func:`stacking_sequence`); the planes are drawn from the
    inner 80 % of the particle's height, so particles too thin to hold a whole cubic step there
    (radius < c/1.6) get fewer.

    ``atoms.info`` records ``rotation`` (3×3, crystal → lab frame), ``n_faults``, and for wurtzite
    ``stacking`` (letters of the bilayers holding atoms, bottom to top along c),
    ``fault_layers`` (indices into ``stacking``) and ``layer_spacing_A`` (c/2).
    """
    lat = get_lattice(name)
    if not radius_A > 0:
        raise ValueError(f"radius_A={radius_A!r} is not allowed: it must be > 0")
    if max_stacking_faults < 0:
        raise ValueError(f"max_stacking_faults={max_stacking_faults} must be >= 0")
    info: dict = {"lattice": name, "radius_A": float(radius_A), "n_faults": 0}
    if lat.kind == "wurtzite":
        hex_cell = np.array(bulk_crystal(name).cell)
        offset = rng.random(3) @ hex_cell  # a random point of the unit cell
        n_faults = int(rng.integers(0, max_stacking_faults + 1))
        pos, num, seq, faults = _wurtzite_cluster(lat, radius_A, offset, n_faults, rng)
        info.update(
            n_faults=len(faults), stacking=seq, fault_layers=faults, layer_spacing_A=lat.c_A / 2
        )
    else:
        cell = bulk_crystal(name)
        basis, cellv = cell.get_positions(), np.array(cell.cell)
        offset = rng.random(3) @ cellv
        shifts = _lattice_points_in_sphere(cellv, radius_A + np.linalg.norm(cellv.sum(0)))
        pos = (shifts[:, None, :] + basis[None, :, :]).reshape(-1, 3) - offset
        num = np.tile(cell.numbers, len(shifts))
        keep = np.einsum("ij,ij->i", pos, pos) <= radius_A**2
        pos, num = pos[keep], num[keep]
    rot = random_rotation(rng)
    info["rotation"] = rot
    return ase.Atoms(numbers=num, positions=pos @ rot.T, info=info)


# --- amorphous carbon -----------------------------------------------------------------------

CARBON_MASS_G = 12.011 * 1.66053906660e-24  # standard atomic weight × atomic mass unit [g]
# random sequential addition of hard spheres jams at a packing fraction of ~0.38 (Feder, J. Theor.
# Biol. 87, 237 (1980)); well below it the batched rejection converges in a few rounds
_MAX_PACKING_FRACTION = 0.3


def carbon_atom_count(area_A2: float, thickness_A: float, density_g_cm3: float) -> int:
    """Number of C atoms of a slab of ``area_A2`` [Å²] × ``thickness_A`` [Å] at the density."""
    return int(round(density_g_cm3 * area_A2 * thickness_A * 1e-24 / CARBON_MASS_G))


def _tree(points: np.ndarray, box: np.ndarray) -> cKDTree:
    """A periodic KD-tree of ``points``, built for speed (an unbalanced tree without compaction
    answers every distance query exactly as the default one, and builds faster)."""
    return cKDTree(points, boxsize=box, balanced_tree=False, compact_nodes=False)


def amorphous_carbon(
    size_xy_A: float,
    thickness_A: float,
    density_g_cm3: float,
    min_distance_A: float,
    rng: np.random.Generator,
) -> ase.Atoms:
    """A random packing of carbon atoms filling [0, L)² × [0, T] at the given density [g/cm³].

    No two atoms are closer than ``min_distance_A`` [Å], counting periodic images in x and y (the
    slab tiles the multislice field). Random sequential addition, vectorised: candidates are drawn
    uniformly in batches; a candidate survives if no accepted atom lies within the minimum distance
    (KD-tree with a periodic box; the z period T + d is long enough that no wrapped pair across z
    comes closer than d) and no earlier candidate of its batch does. Batches repeat until the atom
    count of the density is reached; the last batch is truncated in draw order.
    """
    L, T, d = float(size_xy_A), float(thickness_A), float(min_distance_A)
    for nm, v in (("size_xy_A", L), ("thickness_A", T), ("density_g_cm3", density_g_cm3)):
        if not v > 0:
            raise ValueError(f"{nm}={v!r} is not allowed: it must be > 0")
    if d < 0:
        raise ValueError(f"min_distance_A={d!r} is not allowed: it must be >= 0")
    n_target = carbon_atom_count(L * L, T, density_g_cm3)
    phi = n_target / (L * L * T) * math.pi * d**3 / 6
    if phi > _MAX_PACKING_FRACTION:
        raise ValueError(
            f"density {density_g_cm3} g/cm³ with min_distance_A={d} needs packing fraction "
            f"{phi:.2f}; allowed is <= {_MAX_PACKING_FRACTION} (random packing jams near 0.38)"
        )
    box = np.array([L, L, T + d])
    scale = np.array([L, L, T])
    batches: list[np.ndarray] = []  # the atoms accepted in each round
    trees: list[cKDTree] = []  # one per round: a round's atoms are indexed once, not again
    n_accepted = 0
    for _ in range(1000):  # each round accepts a sizeable fraction; bound only against bad input
        missing = n_target - n_accepted
        if missing <= 0:
            break
        cand = rng.random((int(missing * 1.3) + 16, 3)) * scale
        cand[:, :2] %= L  # guard against x == L after rounding (cKDTree needs data < box)
        if d > 0:
            for tree in trees:  # no accepted atom of any earlier round within d
                dist, _ = tree.query(cand, distance_upper_bound=d)
                cand = cand[~np.isfinite(dist) | (dist >= d)]
        tree = _tree(cand, box) if d > 0 and len(cand) > 1 else None
        if tree is not None:
            pairs = tree.query_pairs(d, output_type="ndarray")
            drop = np.zeros(len(cand), bool)
            drop[pairs.max(axis=1)] = True  # the later draw of a close pair goes
            cand = cand[~drop]
        batch = cand[:missing]
        if len(batch):
            batches.append(batch)
            n_accepted += len(batch)
            if d > 0:
                trees.append(_tree(batch, box))
    else:
        raise RuntimeError(f"amorphous carbon did not reach {n_target} atoms")  # pragma: no cover
    accepted = np.concatenate(batches) if batches else np.empty((0, 3))
    carbon = ase.Atoms(
        numbers=np.full(len(accepted), 6),
        positions=accepted,
        cell=[L, L, T],
        pbc=(True, True, False),
    )
    return carbon


# --- scenes ---------------------------------------------------------------------------------

VACUUM_A = 3.0  # vacuum kept below the slab and above the highest particle [Å]
PLACEMENT_TRIES = 200  # random positions tried per particle before it is left out


@dataclass
class Scene:
    """One simulated specimen; beam along +z through the cell (L, L, H).

    ``atoms``: carbon slab + particles (tag 0 = carbon, tag i = particle i, 1-based);
    ``particles``: the particles alone ("particles in vacuum", for the labels), same positions and
    cell; ``info``: per particle ``lattice``, ``radius_A``, ``center_A`` (x, y, z) [Å],
    ``n_faults``, and for wurtzite ``stacking``.
    """

    atoms: ase.Atoms
    particles: ase.Atoms
    info: list[dict]


def _place_particles(
    radii_A: np.ndarray, field_A: float, gap_A: float, rng: np.random.Generator
) -> list[tuple[float, np.ndarray]]:
    """(radius, xy centre) of the particles that fit: inside the field, ≥ ``gap_A`` apart.

    Larger particles are placed first (they are hardest to fit); a particle that finds no free
    spot in PLACEMENT_TRIES random draws is left out.
    """
    placed: list[tuple[float, np.ndarray]] = []
    for r in sorted(radii_A, reverse=True):
        tries = rng.uniform(r, field_A - r, size=(PLACEMENT_TRIES, 2))
        ok = np.ones(PLACEMENT_TRIES, bool)
        for r_other, c_other in placed:
            ok &= np.linalg.norm(tries - c_other, axis=1) >= r + r_other + gap_A
        if ok.any():
            placed.append((float(r), tries[np.argmax(ok)]))
    return placed


def build_scene(
    sim: SimulationConfig,
    lattice: str,
    radius_range_nm: tuple[float, float],
    rng: np.random.Generator,
) -> Scene:
    """Particles of ``lattice`` resting on an amorphous carbon slab in the field of ``sim``.

    Number of particles uniform in ``sim.particles_per_image`` (fewer when they do not fit),
    radii uniform in ``radius_range_nm`` [nm], every particle inside the field and at least
    ``sim.particle_gap_nm`` from the others (surface to surface); carbon thickness uniform in
    ``sim.carbon_thickness_nm`` (0 nm: no support). Each particle sits on the slab, its lowest
    possible atom ``sim.carbon_min_distance_A`` above the highest carbon plane. A contamination
    layer (``sim.contamination_nm`` > 0, uniform thickness) of amorphous carbon covers the whole
    field ``sim.carbon_min_distance_A`` above the highest particle (tag 0, like the support: it
    is not particle); its draws come after every other, so a scene without one is unchanged.
    """
    get_lattice(lattice)
    r_lo, r_hi = radius_range_nm
    if not 0 < r_lo <= r_hi:
        raise ValueError(f"radius_range_nm={radius_range_nm} must satisfy 0 < lo <= hi")
    L = sim.field_nm * 10
    if 2 * r_hi * 10 > L:
        raise ValueError(
            f"a particle of radius {r_hi} nm cannot fit in the {sim.field_nm} nm field; "
            f"allowed radii are <= {sim.field_nm / 2} nm"
        )
    n_lo, n_hi = sim.particles_per_image
    n = int(rng.integers(n_lo, n_hi + 1))
    radii = rng.uniform(r_lo, r_hi, size=n) * 10
    placed = _place_particles(radii, L, sim.particle_gap_nm * 10, rng)  # the first always fits

    t_lo, t_hi = sim.carbon_thickness_nm
    thickness = rng.uniform(t_lo, t_hi) * 10
    if thickness > 0:
        carbon = amorphous_carbon(
            L, thickness, sim.carbon_density_g_cm3, sim.carbon_min_distance_A, rng
        )
    else:  # no support: the particles float in vacuum (the substrate series' thinnest domain)
        carbon = ase.Atoms(cell=[L, L, 0.0], pbc=(True, True, False))
    slab_top = VACUUM_A + thickness
    pos, num, tags, info = [carbon.positions + [0, 0, VACUUM_A]], [carbon.numbers], [], []
    tags.append(np.zeros(len(carbon), int))
    for i, (r, xy) in enumerate(placed, start=1):
        part = make_particle(lattice, r, rng, sim.max_stacking_faults)
        center = np.array([xy[0], xy[1], slab_top + sim.carbon_min_distance_A + r])
        pos.append(part.positions + center)
        num.append(part.numbers)
        tags.append(np.full(len(part), i))
        entry = {"lattice": lattice, "radius_A": r, "center_A": tuple(center.tolist())}
        entry["n_faults"] = part.info["n_faults"]
        if "stacking" in part.info:
            entry["stacking"] = part.info["stacking"]
        info.append(entry)
    top = max(c["center_A"][2] + c["radius_A"] for c in info)
    k_lo, k_hi = sim.contamination_nm
    if k_hi > 0:  # (no draw otherwise: the scenes of every other series keep their streams)
        layer = rng.uniform(k_lo, k_hi) * 10
        if layer > 0:
            cover = amorphous_carbon(
                L, layer, sim.carbon_density_g_cm3, sim.carbon_min_distance_A, rng
            )
            base = top + sim.carbon_min_distance_A
            pos.append(cover.positions + [0, 0, base])
            num.append(cover.numbers)
            tags.append(np.zeros(len(cover), int))
            top = base + layer
    height = top + VACUUM_A
    cell = [L, L, height]
    atoms = ase.Atoms(
        numbers=np.concatenate(num),
        positions=np.concatenate(pos),
        tags=np.concatenate(tags),
        cell=cell,
        pbc=(True, True, False),
    )
    particles = atoms[atoms.get_tags() > 0]
    return Scene(atoms=atoms, particles=particles, info=info)
