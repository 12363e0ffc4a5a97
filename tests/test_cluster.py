"""The sweep on real clusters: a single-node SLURM cluster and a standalone Dask scheduler.

tests/test_sweep.py runs Dask only as a LocalCluster: there the SLURM job script is built but never
submitted, and ``--scheduler`` never meets a scheduler process. Here the README's recipes
("Sweeps on a cluster (Dask)") run as written: ``hrtem-book sweep --cluster slurm.yaml`` submits
real batch jobs to Debian's slurmctld + slurmd (started in a temporary folder, stopped by PID), and
``--scheduler tcp://…`` reaches separate ``dask scheduler`` / ``dask worker`` processes. Each must
give the in-process database, and a job killed with ``scancel`` mid-sweep must cost only the runs
it had in flight.

The SLURM daemons need root (slurmd starts each job as its owner; munged runs as the munge user)
and Debian's ``slurmd slurmctld slurm-client munge`` (``make slurm``, a step of ``make test``);
without them the SLURM tests skip and say why. Only the defocus study (5 smoke runs) is swept, so
that the module stays well under two minutes on two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import xarray as xr

from hrtem_book import datasets
from hrtem_book.executors import load_cluster_config, make_cluster
from hrtem_book.profiles import get_profile
from hrtem_book.results import build_database
from hrtem_book.studies import STUDIES, build_grid
from hrtem_book.sweep import run_sweep

SMOKE = get_profile("smoke")
STUDY = "defocus"
N_RUNS = len(build_grid(STUDY, SMOKE).pretrains) + len(build_grid(STUDY, SMOKE).runs)
README = Path(__file__).resolve().parents[1] / "README.md"

# The README's recipes, verbatim (test_readme_shows_the_tested_recipes keeps them in step). The
# test cluster's partition is called "cpu", so SLURM_RECIPE runs unchanged.
SLURM_RECIPE = """\
kind: slurm
jobs: 1                    # SLURM jobs to submit; each runs `processes` Dask workers
cluster:                   # keyword arguments of dask_jobqueue.SLURMCluster
  queue: cpu               # partition (#SBATCH -p)
  cores: 2                 # CPUs of one job (#SBATCH --cpus-per-task), shared by its workers
  processes: 2             # Dask workers per job: one single-threaded worker per core
  memory: 2GB              # memory of one job (#SBATCH --mem), split between its workers
  walltime: "01:00:00"     # time limit of one job (#SBATCH -t)
  log_directory: slurm-logs  # the jobs' stdout/stderr, relative to where the sweep starts
device: cpu                # torch device of the runs
"""
GPU_RECIPE = """\
kind: slurm
jobs: 4                    # four jobs, one GPU each
cluster:
  queue: gpu
  cores: 1                 # one worker thread per job: one run at a time on its GPU
  processes: 1
  job_cpu: 8               # CPUs booked per job (#SBATCH --cpus-per-task)
  memory: 32GB
  walltime: "04:00:00"
  job_extra_directives: ["--gres=gpu:1"]   # one GPU per job; SLURM sets CUDA_VISIBLE_DEVICES
  log_directory: slurm-logs
device: cuda               # the runs train on the job's GPU
"""
PARTITION = "cpu"

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scancel")
# slurmctld, slurmd and munged live in /usr/sbin, which a non-login PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _binary(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} missing)"


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop a process we started, by its PID, and then any of its children that outlive it.

    SIGTERM first (slurmd, slurmctld, munged and Dask's nanny all shut down cleanly on it), SIGKILL
    after ``grace`` seconds; children are listed before the signal, as they are orphaned after.
    """
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def _wait_for(what: str, ready, timeout: float, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{_tail(p)}" for p in logs)
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s\n{tails}")
        time.sleep(0.1)


# --- a single-node SLURM cluster ------------------------------------------------------------------
class SingleNodeSlurm:
    """munged + slurmctld + slurmd for this machine as one node, all state in a temporary folder.

    Nothing outside the folder is touched (no /etc/slurm, no systemd): the key and socket of munge
    and the ports of slurmctld/slurmd are private, so a second test session or a site's own SLURM
    can run beside it. Every daemon is a child of this process and is stopped by its PID.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.munge_dir: Path | None = None
        self.node = ""

    def command(self, name: str, *args: str, timeout: float = 15) -> str:
        """Run a SLURM client command against this cluster; return its stdout."""
        out = subprocess.run(
            [_binary(name), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return out.stdout

    def jobs(self) -> list[str]:
        return self.command("squeue", "-h", "-o", "%i").split()

    def node_state(self) -> str:
        try:
            return self.command("sinfo", "-h", "-N", "-o", "%t", timeout=5).strip()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return ""

    def _daemon(self, name: str, args: list[str], **kw) -> None:
        with open(self.folder / f"{name}.out", "wb") as log:  # the daemon keeps its own copy
            self.procs[name] = subprocess.Popen(
                [_binary(name), *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kw,
            )

    def _logs(self) -> list[Path]:
        return sorted(self.folder.glob("*.out")) + sorted(self.folder.glob("*.log"))

    def start(self, timeout: float = 60) -> None:
        self._start_munge()
        hw = subprocess.run(
            [_binary("slurmd"), "-C"],
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in os.environ.items() if k != "SLURM_CONF"},
            check=True,
        ).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", hw))
        self.node = fields["NodeName"]
        memory = int(int(fields["RealMemory"]) * 0.9)  # below what slurmd finds, or it drains
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        d = self.folder
        self.conf.write_text(
            f"""\
ClusterName=hrtem-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_dir / "munge.socket"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={fields["CPUs"]} RealMemory={memory} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._daemon("slurmctld", ["-D", "-c"])
        self._daemon("slurmd", ["-D", "-N", self.node])
        _wait_for("the SLURM node", lambda: self.node_state() == "idle", timeout, self._logs())

    def _start_munge(self) -> None:
        # munged runs as the munge user, which cannot enter pytest's 0700 temporary folders, and
        # a unix socket path must stay under 108 bytes: a short folder in /tmp, owned by munge
        munge = pwd.getpwnam("munge")
        self.munge_dir = Path(tempfile.mkdtemp(prefix="hrtem-munge-"))
        self.munge_dir.chmod(0o755)  # munged insists that everyone may reach its socket
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        m = self.munge_dir
        self._daemon(
            "munged",
            [
                "-F",
                f"--socket={m}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
        )
        _wait_for("munged", (m / "munge.socket").exists, 15, [self.folder / "munged.out"])

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait until none is left (their processes are gone with them)."""
        jobs = self.jobs()
        if jobs:
            self.command("scancel", *jobs)
        _wait_for("an empty SLURM queue", lambda: not self.jobs(), timeout, self._logs())

    def stop(self) -> None:
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.cancel_all()  # jobs first: a job outliving slurmd would keep its workers
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                if name in self.procs:
                    _stop(self.procs[name])
            if self.munge_dir is not None:
                shutil.rmtree(self.munge_dir, ignore_errors=True)


def _slurm_unavailable() -> str | None:
    missing = [b for b in SLURM_BINARIES if _binary(b) is None]
    if missing:
        how = "no apt-get here to install them"
        if shutil.which("apt-get"):
            how = "`make slurm` (a step of `make test`) installs them with apt-get"
        return f"SLURM is not installed ({', '.join(missing)} missing): {how}"
    if os.geteuid() != 0:
        return "the single-node SLURM cluster needs root (slurmd starts jobs as their owner)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user to run munged as (Debian's munge package creates it)"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node SLURM cluster for the session; its daemons are stopped at the end.

    ``SLURM_CONF`` points at it for the session, so the sweep's dask-jobqueue (sbatch, scancel)
    and the sweep subprocesses reach this cluster and no other.
    """
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SingleNodeSlurm(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()


@pytest.fixture
def slurm_cluster(slurm, tmp_path, monkeypatch):
    """The session's cluster, from ``tmp_path`` (the jobs' folder), with no job left afterwards."""
    monkeypatch.chdir(tmp_path)  # sbatch submits from here: the recipe's slurm-logs/ lands here
    assert slurm.jobs() == []
    yield slurm
    slurm.cancel_all()


# --- projects and the reference database ------------------------------------------------------
@pytest.fixture(scope="session")
def defocus_data(tmp_path_factory) -> Path:
    """The smoke defocus series, simulated once; every project links it as its data/smoke."""
    root = tmp_path_factory.mktemp("cluster-data") / "data" / "smoke"
    datasets.generate(STUDIES[STUDY].series, SMOKE.data, root, progress=False)
    return root


def _project(tmp_path: Path, data: Path, name: str) -> Path:
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    (root / "data" / "smoke").symlink_to(data, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def reference(tmp_path_factory, defocus_data):
    """The in-process sweep's database: what every cluster must reproduce."""
    root = _project(tmp_path_factory.mktemp("inprocess"), defocus_data, "inprocess")
    summary = run_sweep(STUDY, SMOKE, root, progress=False, log=lambda msg: None)
    assert summary.done == N_RUNS
    db = build_database(STUDY, SMOKE, root)
    assert bool((db["status"] == "ok").any())
    return db


def _assert_same_database(reference: xr.Dataset, root: Path) -> None:
    db = build_database(STUDY, SMOKE, root)
    assert set(np.unique(db["status"].values)) <= {"ok", "excluded"}
    # identical numbers; only wall times (``*_time_s``) and creation stamps differ
    timings = [name for name in reference.data_vars if str(name).endswith("_time_s")]
    assert "train_time_s" in timings
    xr.testing.assert_identical(
        reference.drop_vars(timings).drop_attrs(), db.drop_vars(timings).drop_attrs()
    )


def _records(root: Path) -> dict[str, bytes]:
    folder = root / "results" / "smoke" / "records"
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _sweep_command(root: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hrtem_book.cli",
        "sweep",
        "--study",
        STUDY,
        "--profile",
        "smoke",
        "--root",
        str(root),
        *args,
    ]


def _sweep_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HRTEM_BOOK_THREADS": "1"}


def _sweep(root: Path, *args: str, timeout: float = 120) -> str:
    """The real command line in its own process (a hang becomes a failure, not a stuck session);
    returns its stderr, where the summary line is."""
    proc = subprocess.run(
        _sweep_command(root, *args),
        env=_sweep_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _summary(done: int, skipped: int) -> str:
    return f"sweep {STUDY} (profile smoke): {done} done, {skipped} skipped, 0 failed"


def _worker_threads(log_folder: Path) -> list[int]:
    """Threads of every Dask worker that logged into ``log_folder`` (Dask prints 'Threads: n')."""
    text = "".join(p.read_text(errors="replace") for p in log_folder.glob("*.err"))
    return [int(n) for n in re.findall(r"Threads:\s+(\d+)", text)]


# --- the tests ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")  # another dashboard is up
def test_readme_shows_the_tested_recipes(tmp_path, monkeypatch):
    """The README's yaml is the yaml these tests run; the GPU one builds the job it promises."""
    readme = README.read_text()
    assert SLURM_RECIPE in readme and GPU_RECIPE in readme
    assert "tests/test_cluster.py" in readme
    monkeypatch.chdir(tmp_path)  # log_directory is created where the cluster is built
    path = tmp_path / "gpu.yaml"
    path.write_text(GPU_RECIPE)
    cfg = load_cluster_config(path)
    assert cfg["device"] == "cuda" and cfg["jobs"] == 4
    cluster = make_cluster(cfg, scale=False)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in (
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH -p gpu",
        "#SBATCH -t 04:00:00",
        "export OMP_NUM_THREADS=1",
    ):
        assert line in script
    assert "--nthreads 1" in script and "--nworkers" not in script  # one worker, one thread


@pytest.mark.slow
def test_slurm_sweep_gives_the_in_process_database(
    slurm_cluster, tmp_path, defocus_data, reference
):
    root = _project(tmp_path, defocus_data, "slurm")
    (tmp_path / "slurm.yaml").write_text(SLURM_RECIPE)
    err = _sweep(root, "--cluster", "slurm.yaml")
    assert _summary(N_RUNS, 0) in err
    _assert_same_database(reference, root)
    # the runs went through a SLURM batch job: its two workers logged there, single-threaded
    assert _worker_threads(tmp_path / "slurm-logs") == [1, 1]


@pytest.mark.slow
def test_scancel_mid_sweep_loses_only_runs_in_flight(
    slurm_cluster, tmp_path, defocus_data, reference
):
    """A job that dies (scancel, preemption, walltime) takes its in-flight runs with it; the sweep
    then waits for workers that never come (dask-jobqueue does not replace a lost job), the user
    interrupts it, and a rerun does exactly the runs that were not recorded."""
    root = _project(tmp_path, defocus_data, "scancel")
    (tmp_path / "slurm.yaml").write_text(SLURM_RECIPE)
    folder = root / "results" / "smoke" / "records" / STUDY
    log = tmp_path / "sweep.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            _sweep_command(root, "--cluster", "slurm.yaml"),
            env=_sweep_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # Ctrl-C reaches the sweep even when this session ignores SIGINT (a shell starts a
            # background job with SIGINT ignored, and the children inherit that)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        # the pretraining is recorded first; its transfer runs are then in flight on the job
        deadline = time.monotonic() + 90
        while not list(folder.glob("*.json")):
            assert proc.poll() is None, _tail(log)
            assert time.monotonic() < deadline, _tail(log)
            time.sleep(0.02)
        jobs = slurm_cluster.jobs()
        assert len(jobs) == 1
        slurm_cluster.command("scancel", *jobs)
        _wait_for("the cancelled job's end", lambda: not slurm_cluster.jobs(), 30)
        # the records, without the lock files of the runs the sweep still holds in flight
        before = {k: v for k, v in _records(root).items() if not k.endswith(".lock")}
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 130, _tail(log)  # an interruption, not a success
        assert "interrupted; finished work is kept" in _tail(log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert 1 <= len(before) < N_RUNS
    # nothing recorded after the job died; no temporary or lock file left
    assert _records(root) == before
    assert all(json.loads(raw)["status"] == "ok" for raw in before.values())

    err = _sweep(root, "--cluster", "slurm.yaml")
    assert _summary(N_RUNS - len(before), len(before)) in err
    after = _records(root)
    assert len(after) == N_RUNS
    assert all(after[name] == raw for name, raw in before.items())  # finished records untouched
    _assert_same_database(reference, root)


@pytest.fixture
def dask_scheduler(tmp_path):
    """``dask scheduler`` and one ``dask worker --nthreads 1`` as separate processes, as the
    README's recipe starts them; yields the scheduler address; both are stopped by PID."""
    dask = Path(sys.executable).with_name("dask")
    scheduler_cmd = (
        [str(dask), "scheduler"]
        if dask.exists()
        else [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    )
    worker_cmd = (
        [str(dask), "worker"]
        if dask.exists()
        else [sys.executable, "-m", "distributed.cli.dask_worker"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / "scheduler.log", tmp_path / "worker.log"]
    try:
        with open(logs[0], "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        *scheduler_cmd,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--no-dashboard",
                        "--scheduler-file",
                        str(file),
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        _wait_for("dask scheduler", file.exists, 60, logs[:1])
        address = json.loads(file.read_text())["address"]
        with open(logs[1], "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        *worker_cmd,
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--no-dashboard",
                        "--local-directory",
                        str(tmp_path / "worker"),
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        yield address, logs[1]
    finally:
        for proc in reversed(procs):  # the worker (its nanny and process), then the scheduler
            _stop(proc)


@pytest.mark.slow
def test_standalone_scheduler_gives_the_in_process_database(
    dask_scheduler, tmp_path, defocus_data, reference
):
    address, worker_log = dask_scheduler
    assert address.startswith("tcp://127.0.0.1:")
    root = _project(tmp_path, defocus_data, "scheduler")
    err = _sweep(root, "--executor", "dask", "--scheduler", address)
    assert _summary(N_RUNS, 0) in err
    _assert_same_database(reference, root)
    assert re.findall(r"Threads:\s+(\d+)", worker_log.read_text()) == ["1"]
    assert sorted(p.name for p in (root / "results" / "smoke" / "records").iterdir()) == [STUDY]
