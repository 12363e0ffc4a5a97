"""The pipeline's sub-commands: their arguments and the checks of every value a user gives.

    hrtem-book simulate --series defocus --profile smoke
    hrtem-book train --series defocus --pretrain -10 --transfer 0 --n-transfer 4 --profile smoke
    hrtem-book sweep --study all --profile laptop
    hrtem-book collect --profile laptop
    hrtem-book campaign --profile gpu --out results/gpu --device cuda

This module imports only the light, pure-Python part of the package (profiles, series, studies,
configs, the folder layout): a bad value is refused in a fraction of a second, before torch,
xarray or Dask are imported (3-4 s on two cores). Each command then hands the checked values to
the module that does the work (:mod:`.datasets`, :mod:`.runs`, :mod:`.sweep`, :mod:`.findings`,
:mod:`.campaign`), imported at that moment. What only the machine can answer (is a CUDA device
there, does the CPU compute bf16 natively, does a scheduler answer) is checked right after that
import, still before any work. The book's commands live in :mod:`hrtem_book.book`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .config import (
    CAMPAIGN_RESERVE_S,
    FREEZE_OPTIONS,
    PretrainConfig,
    RunConfig,
    TransferConfig,
    check_device_name,
)
from .executors import EXECUTORS, connect, load_cluster_config
from .layout import Layout, check_writable
from .profiles import Profile, get_profile, pin_cpu
from .series import SERIES, get_series
from .studies import STUDY_GROUPS, STUDY_NAMES, expand_studies


def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{flag} {value}; allowed: an integer >= 1")


# --- simulate (hrtem_book.datasets) ---------------------------------------------------------
def _simulate(args: argparse.Namespace) -> int:
    get_series(args.series)
    profile = get_profile(args.profile)
    _at_least_one("--workers", args.workers)
    check_device_name(args.device)
    out = Path(args.out) if args.out else Layout.of(args.root, profile).data_dir
    pin_cpu(profile)  # before torch is imported (StageConfig.cpu_isa)
    from .datasets import generate
    from .simulate import check_device

    check_device(args.device)  # what the machine has, before a folder is made
    check_writable(out, "--out" if args.out else "--root")
    print(generate(args.series, profile.data, out, device=args.device, workers=args.workers))
    return 0


def _register_simulate(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="simulate a dataset series (cached, resumable)")
    p.add_argument("--series", required=True, help=f"one of: {', '.join(SERIES)}")
    p.add_argument("--profile", required=True, help="profile name (see hrtem_book.profiles)")
    p.add_argument("--root", default=".", help="project folder holding data/ (default .)")
    p.add_argument("--out", default=None, help="output folder (default: <root>/data/<profile>)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--workers", type=int, default=1, help="CPU processes (default 1)")
    p.set_defaults(func=_simulate)


# --- train (hrtem_book.runs) ----------------------------------------------------------------
def config_from_args(args: argparse.Namespace, profile: Profile) -> RunConfig:
    """The run config of ``train``'s arguments; ValueError naming a bad value and what is
    allowed."""
    if args.series not in SERIES:
        raise ValueError(f"--series {args.series!r}; allowed: {', '.join(SERIES)}")
    spec = get_series(args.series)
    allowed = profile.data.domains(args.series)
    domains = {}
    for flag in ("pretrain", "transfer"):
        text = getattr(args, flag)
        if text is None:
            continue
        try:
            value = spec.normalize(spec.parse(text))
        except ValueError:
            value = None
        if value not in allowed:
            shown = ", ".join(map(str, allowed))
            raise ValueError(f"--{flag} {text!r}; allowed for {args.series}: {shown}")
        domains[flag] = value
    n_pretrain_max = spec.n_train(profile.data, domains["pretrain"])
    if profile.n_pretrain > n_pretrain_max:
        raise ValueError(
            f"--pretrain {args.pretrain!r} has {n_pretrain_max} training images, "
            f"fewer than a pretraining's {profile.n_pretrain} ({profile.name}); allowed: "
            + ", ".join(
                str(d) for d in allowed if spec.n_train(profile.data, d) >= profile.n_pretrain
            )  # fmt: skip
        )
    if "transfer" in domains:
        n_max = spec.n_train(profile.data, domains["transfer"])
        if args.n_transfer is None:
            raise ValueError(f"--transfer needs --n-transfer; allowed: 1..{n_max} ({profile.name})")
        if not 1 <= args.n_transfer <= n_max:
            raise ValueError(
                f"--n-transfer {args.n_transfer}; allowed: 1..{n_max} ({profile.name})"
            )
    elif args.n_transfer is not None:
        raise ValueError("--n-transfer without --transfer; allowed: both or neither")
    elif args.freeze != "none":
        raise ValueError(f"--freeze {args.freeze!r} without --transfer; freezing applies to a "
                         "transfer: give --transfer or drop --freeze")  # fmt: skip
    pretrain = PretrainConfig(
        data=profile.data,
        series=args.series,
        domain=domains["pretrain"],
        lr=args.pretrain_lr,
        seed=args.seed,
        model=profile.model,
        stage=profile.stage,
        n_train=profile.n_pretrain,
    )
    if "transfer" not in domains:
        return pretrain
    return TransferConfig(
        pretrain, domains["transfer"], args.n_transfer, args.transfer_lr, args.freeze,
        profile.transfer,
    )  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    profile = get_profile(args.profile)
    layout = Layout.of(args.root, profile)
    cfg = config_from_args(args, profile)
    check_device_name(args.device)
    pin_cpu(profile)  # before torch is imported (StageConfig.cpu_isa)
    from .runs import check_compute, train_one

    check_compute([cfg], args.device)  # what the machine has (CUDA, bf16), before a folder is made
    # before any training: a record that cannot be written would lose the work
    for folder in (layout.records_dir("train"), layout.checkpoints_dir, layout.data_dir):
        check_writable(folder)
    record, out = train_one(cfg, layout, args.device)
    print(f"{record['status']}: {record['error'] or 'record'} -> {out}")
    return 0 if record["status"] == "ok" else 1


def _register_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain (and transfer) one model; write its record")
    p.add_argument("--series", required=True, help=f"one of {', '.join(SERIES)}")
    p.add_argument("--pretrain", required=True, help="pretraining domain (defocus nm, dose, name)")
    p.add_argument("--transfer", help="transfer domain; omitted: pretrain only")
    p.add_argument("--n-transfer", type=int, help="target training images (with --transfer)")
    p.add_argument("--freeze", default="none", help=f"one of {', '.join(FREEZE_OPTIONS)}")
    p.add_argument("--profile", default="laptop")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--transfer-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--root", default=".", help="project folder holding data/ and results/")
    p.set_defaults(func=_train)


# --- sweep (hrtem_book.sweep) ---------------------------------------------------------------
def _sweep(args: argparse.Namespace) -> int:
    profile = get_profile(args.profile)
    studies = expand_studies(args.study)
    _at_least_one("--workers", args.workers)
    _at_least_one("--sim-workers", args.sim_workers)
    cluster_config = load_cluster_config(args.cluster) if args.cluster else None
    executor = "dask" if (cluster_config or args.scheduler) else args.executor
    device = args.device or (cluster_config or {}).get("device", "cpu")
    check_device_name(device)
    layout = Layout.of(args.root, profile)
    pin_cpu(profile)  # before torch is imported (StageConfig.cpu_isa); workers inherit it
    from .sweep import check_profile_compute, run_sweep

    check_profile_compute(profile, device)  # what the machine has, before a folder is made
    for folder in (layout.data_dir, layout.records_root, layout.checkpoints_dir):
        check_writable(folder)  # before any work: a record that cannot be written is work lost
    if args.scheduler:
        connect(args.scheduler).close()  # fail in seconds, before simulating anything
    summary = run_sweep(
        studies,
        profile,
        args.root,
        executor=executor,
        workers=args.workers,
        cluster_config=cluster_config,
        scheduler_address=args.scheduler,
        retry_failed=args.retry_failed,
        device=device,
        sim_workers=args.sim_workers,
    )
    return 1 if summary.failed or summary.errors else 0


SWEEP_USAGE = """Run the study grids: resumable, atomic, on one process or a Dask cluster.

    hrtem-book sweep --study all --profile laptop
    hrtem-book sweep --study defocus --profile paper --executor dask --workers 2
    hrtem-book sweep --study defocus --profile paper --executor dask --cluster slurm.yaml

A rerun skips every recorded run (results/<profile>/records/<study>/<hash>.json); see the
module hrtem_book.sweep for the scheduling and README "Failure contract" for what survives a kill.
"""


def _register_sweep(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a study grid (resumable; records under results/<profile>/records)",
        description=SWEEP_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--study", required=True, choices=(*STUDY_NAMES, *STUDY_GROUPS))
    p.add_argument("--profile", required=True, help="profile name, e.g. smoke, laptop, paper")
    p.add_argument("--root", default=".", help="project folder holding data/ and results/")
    p.add_argument("--executor", default="inprocess", choices=EXECUTORS)
    p.add_argument("--workers", type=int, default=2, help="Dask LocalCluster worker processes")
    p.add_argument("--cluster", help="YAML file describing a Dask cluster (kind: local|slurm)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:port)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--sim-workers", type=int, default=1, help="processes simulating data")
    p.add_argument("--device", default=None, help="torch device of the runs (default cpu)")
    p.set_defaults(func=_sweep)


# --- collect (hrtem_book.findings) ----------------------------------------------------------
def _collect(args: argparse.Namespace) -> int:
    profile = get_profile(args.profile)
    layout = Layout.of(args.root, profile)
    no_records = FileNotFoundError(
        f"no records under {layout.records_root}; run "
        f"`hrtem-book sweep --study all --profile {profile.name}` first"
    )
    if not layout.records_root.is_dir():  # before the import of xarray
        raise no_records
    from .findings import collect_and_count

    lines = collect_and_count(profile, args.root)
    if not lines:
        raise no_records
    print("\n".join(lines))
    return 0


def _register_collect(subparsers) -> None:
    p = subparsers.add_parser(
        "collect",
        help="gather sweep records into results/<profile>/<study>.nc databases, stamped with "
        "the rule set that scores them",
    )
    p.add_argument("--profile", required=True, help="profile name, e.g. smoke, laptop, paper")
    p.add_argument("--root", default=".", help="project folder holding results/")
    p.set_defaults(func=_collect)


# --- campaign (hrtem_book.campaign) ---------------------------------------------------------
def _campaign(args: argparse.Namespace) -> int:
    profile = get_profile(args.profile)
    check_device_name(args.device)
    if not (math.isfinite(args.budget_s) and args.budget_s > CAMPAIGN_RESERVE_S):  # nan: False
        raise ValueError(
            f"--budget-s {args.budget_s:g}; allowed: more than {CAMPAIGN_RESERVE_S:g} s"
        )
    if args.bench_steps < 0:
        raise ValueError(f"--bench-steps {args.bench_steps}; allowed: 0 (no benchmark) or more")
    _at_least_one("--max-stack", args.max_stack)
    pin_cpu(profile)  # before torch is imported (StageConfig.cpu_isa)
    from .campaign import run_campaign
    from .sweep import check_profile_compute

    check_profile_compute(profile, args.device)
    result = run_campaign(
        profile, args.root, args.out, device=args.device, budget_s=args.budget_s,
        max_stack=args.max_stack, bench_scale=args.bench_scale, bench_steps=args.bench_steps,
    )  # fmt: skip
    return 0 if not (result["runs_failed"] or result["runs_errors"]) else 1


def _register_campaign(subparsers) -> None:
    p = subparsers.add_parser(
        "campaign",
        help="simulate, sweep as model stacks, collect and benchmark on one device, in a budget",
        description="Simulate, sweep, collect and benchmark a profile on one device (a GPU) "
        "within a wall-time budget; see the module hrtem_book.campaign.",
    )
    p.add_argument("--profile", required=True, help="profile name, e.g. gpu (or smoke: rehearsal)")
    p.add_argument("--out", required=True, help="folder for the databases and the JSON files")
    p.add_argument("--root", default=".", help="project folder holding data/ and results/")
    p.add_argument("--device", default="cuda", help="torch device (cpu for the rehearsal)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget [s]")
    p.add_argument("--max-stack", type=int, default=64, help="models trained as one stack")
    p.add_argument("--bench-scale", default="paper", choices=("paper", "profile"))
    p.add_argument("--bench-steps", type=int, default=10, help="0: no benchmark")
    p.set_defaults(func=_campaign)


def register_cli(subparsers) -> None:
    """Add the pipeline's commands in data-flow order."""
    for register in (
        _register_simulate, _register_train, _register_sweep, _register_collect,
        _register_campaign,
    ):  # fmt: skip
        register(subparsers)
