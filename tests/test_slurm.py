"""Slurm tests.

End to end: a real Slurm cluster (Debian's slurm-wlm daemons) is started inside the test and jobs
are submitted to it with `sbatch --wait`: scripts/slurm/cpu_smoke.sbatch on one node, and
scripts/slurm/ssd_two_node.sbatch on CPU across two nodes (two slurmd daemons on this host, each
with its own port and spool: Slurm places the tasks by node as on a real cluster); the bench JSON
the jobs write is checked. Everything lives in a temporary directory: a generated slurm.conf with ports
chosen free at run time, the state/spool directories and (with munge) a private munged with a
fresh key on its own socket. Nothing under /etc is read or written and no system daemon is touched;
root is not needed. Without the Slurm binaries the test skips, or fails when SSD_REQUIRE_SLURM=1
(`.ci/run` installs Slurm from apt and sets it).

Authentication: munge when `munged` is installed (Debian's slurmctld/slurmd depend on it), else
auth/none if the installed Slurm still ships that plugin (newer releases dropped it); override with
SSD_TEST_SLURM_AUTH=munge|none. Process tracking is proctrack/linuxproc with task/none, so no cgroup
setup (cgroup.conf, delegated cgroup v2 controllers) is needed.

Without a cluster: the GPU sbatch scripts run with stub `python`/`scontrol`/`srun`, and the bench
command lines they build must parse with the real bench CLI (two-node: rendezvous from Slurm).
"""
from __future__ import annotations

import contextlib
import getpass
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tiny_models import make_checkpoint

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SMOKE_SCRIPT = REPO / "scripts" / "slurm" / "cpu_smoke.sbatch"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm",
               "/usr/lib64/slurm", "/usr/lib/slurm", "/usr/local/lib/slurm")
NODE_UP_TIMEOUT_S = 45
JOB_TIMEOUT_S = 180
COMMAND_TIMEOUT_S = 20


def require_slurm() -> None:
    """Skip without Slurm, unless SSD_REQUIRE_SLURM=1 (set by .ci/run): then fail, so CI cannot
    pass with the Slurm test silently skipped."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if not missing:
        return
    reason = (f"Slurm not installed (missing {', '.join(missing)}): "
              "`apt-get install slurm-wlm munge`, or run .ci/run")
    if os.environ.get("SSD_REQUIRE_SLURM") == "1":
        pytest.fail(reason + " [SSD_REQUIRE_SLURM=1]")
    pytest.skip(reason)


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_plugin(name: str) -> bool:
    return any(glob.glob(os.path.join(d, f"{name}.so")) for d in PLUGIN_DIRS)


def choose_auth() -> str:
    wanted = os.environ.get("SSD_TEST_SLURM_AUTH")
    if wanted:
        return wanted
    if shutil.which("munged"):
        return "munge"
    if has_plugin("auth_none"):
        return "none"
    pytest.skip("Slurm needs munge (munged not installed) and this Slurm has no auth/none plugin")


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"<{path.name}: missing>"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text)


def node_hardware() -> dict[str, str]:
    """`slurmd -C` reports this machine as slurmd will see it (sockets/cores/threads must match)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                         check=True).stdout
    first = out.splitlines()[0]
    return dict(item.split("=", 1) for item in first.split() if "=" in item)


def stop_process(proc: subprocess.Popen, name: str, timeout_s: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------- the cluster

@dataclass
class SlurmCluster:
    """A private cluster on this machine. With `nodes` it has several compute nodes, one slurmd each
    (its own port, spool, pid and log file: %n is the node name), all on this host — enough for
    Slurm to place a multi-node job's tasks by node as on a real cluster."""
    root: Path
    auth: str
    nodes: tuple[str, ...] = ()
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def node_names(self) -> tuple[str, ...]:
        return self.nodes or (self.host,)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    # ---- configuration
    def auth_lines(self) -> list[str]:
        if self.auth == "munge":
            return ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket()}"]
        return ["AuthType=auth/none", "CredType=cred/none"]

    def node_lines(self) -> list[str]:
        hw = node_hardware()
        memory = min(int(hw.get("RealMemory", "1024")), 1024)
        topology = " ".join(f"{k}={hw[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                     "ThreadsPerCore") if k in hw)
        return [f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} {topology} "
                f"RealMemory={memory} State=UNKNOWN" for name in self.node_names]

    def write_conf(self) -> None:
        user = getpass.getuser()
        r = self.root
        lines = [
            "ClusterName=ssdtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmUser={user}", f"SlurmdUser={user}",
            *self.auth_lines(),
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            # no cgroups: linuxproc tracks job processes via /proc, task/none binds nothing
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "MpiDefault=none", "ReturnToService=2",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=5",
            *self.node_lines(),
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=30 State=UP",
        ]
        (r / "state").mkdir()
        for name in self.node_names:
            (r / "spool" / name).mkdir(parents=True)
        self.conf.write_text("\n".join(lines) + "\n")

    # ---- daemons
    def spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        out.close()

    def start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket()}",
                              f"--key-file={key}", f"--log-file={d / 'munged.log'}",
                              f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"])
        self.wait_for(lambda: self.munge_socket().exists(), 15, "munged socket")

    def start(self) -> None:
        self.write_conf()
        if self.auth == "munge":
            self.start_munge()
        self.spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self.wait_for(self.controller_up, NODE_UP_TIMEOUT_S, "slurmctld answering")
        for name in self.node_names:
            self.spawn(f"slurmd-{name}", ["slurmd", "-D", "-f", str(self.conf), "-N", name])
        self.wait_for(lambda: self.node_states() == ["idle"] * len(self.node_names), NODE_UP_TIMEOUT_S,
                      f"nodes {', '.join(self.node_names)} idle")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(["scancel", "--full", "--user", getpass.getuser()])
            self.wait_for(lambda: not self.run(["squeue", "-h"]).stdout.strip(), 15, "jobs gone")
        for name in [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
            if name in self.procs:
                stop_process(self.procs[name], name)

    # ---- queries
    def run(self, argv: list[str], timeout_s: float = COMMAND_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=kw.pop("env", self.env),
                              timeout=timeout_s, **kw)

    def controller_up(self) -> bool:
        return self.run(["sinfo", "-h"]).returncode == 0

    def node_states(self) -> list[str]:
        return self.run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.split()

    def wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n{self.diagnostics()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                if ready():
                    return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.diagnostics()}")

    def slurmd_log(self, node: str) -> str:
        path = self.root / f"slurmd-{node}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def diagnostics(self) -> str:
        names = ["slurmctld.out", "slurmctld.log"] + [f"slurmd-{n}{ext}" for n in self.node_names
                                                      for ext in (".out", ".log")]
        return "\n".join(tail(self.root / f, 25) for f in names)


@contextlib.contextmanager
def private_cluster(nodes: tuple[str, ...] = ()):
    require_slurm()
    root = Path(tempfile.mkdtemp(prefix="ssd-slurm-", dir="/tmp" if os.path.isdir("/tmp") else None))
    cluster = SlurmCluster(root, choose_auth(), nodes)
    started = time.monotonic()
    try:
        cluster.start()
        log.info("slurm cluster (auth/%s, nodes %s) up in %.1fs at %s", cluster.auth,
                 ",".join(cluster.node_names), time.monotonic() - started, root)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm_cluster():
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def two_node_cluster():
    with private_cluster(("n1", "n2")) as cluster:
        yield cluster


# ---------------------------------------------------------------- the test

def write_char_tokenizer(directory: Path) -> None:
    """A character-level tokenizer over the tiny model's 97-token vocabulary, so the bench's default
    (text) prompt set runs unchanged on the tiny checkpoint."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in " \n" + string.ascii_letters + string.digits + string.punctuation:
        if len(vocab) < 97:
            vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def submit_smoke_job(cluster: SlurmCluster, target: Path, results: Path) -> subprocess.CompletedProcess:
    env = {**cluster.env, "TARGET_DIR": str(target), "RESULTS_DIR": str(results), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cpus = min(2, os.cpu_count() or 1)
    argv = ["sbatch", "--wait", "--parsable", f"--cpus-per-task={cpus}", f"--chdir={REPO}",
            f"--output={results / 'job-%j.out'}", str(SMOKE_SCRIPT)]
    try:
        return cluster.run(argv, timeout_s=JOB_TIMEOUT_S, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbatch --wait did not return in {JOB_TIMEOUT_S}s\n{job_logs(results)}\n{cluster.diagnostics()}")


def job_logs(results: Path) -> str:
    return "\n".join(tail(p, 60) for p in sorted(results.glob("job-*.out"))) or "<no job output>"


def test_cpu_smoke_job_runs_through_slurm(slurm_cluster: SlurmCluster, tmp_path: Path):
    target = make_checkpoint("llama", tmp_path / "tiny-llama")
    write_char_tokenizer(target)
    results = tmp_path / "results"
    results.mkdir()
    started = time.monotonic()
    proc = submit_smoke_job(slurm_cluster, target, results)
    log.info("sbatch --wait returned %d after %.1fs", proc.returncode, time.monotonic() - started)
    context = f"sbatch: {proc.stdout}{proc.stderr}\n{job_logs(results)}\n{slurm_cluster.diagnostics()}"
    assert proc.returncode == 0, f"smoke job failed (rc {proc.returncode})\n{context}"
    result_file = results / "result.json"
    assert result_file.is_file(), f"job wrote no {result_file}\n{context}"
    result = json.loads(result_file.read_text())
    assert result["metrics"]["decode_tok_s"] > 0, context
    assert len(result["outputs"]) == 2, context
    assert all(len(o["token_ids"]) == 8 for o in result["outputs"]), context



TWO_NODE_SCRIPT = REPO / "scripts" / "slurm" / "ssd_two_node.sbatch"


def test_two_node_job_runs_through_slurm(two_node_cluster: SlurmCluster, tmp_path: Path):
    """scripts/slurm/ssd_two_node.sbatch for real on a two-node cluster, on CPU with a tiny pair: Slurm
    places the target rank on n1 and the draft rank on n2 (srun, arbitrary distribution), they
    rendezvous from Slurm's environment, and asynchronous speculation runs end to end; its greedy
    output equals autoregressive decoding (--ab ar,async)."""
    models = {}
    for name, seed in (("target", 0), ("draft", 1)):
        models[name] = make_checkpoint("llama", tmp_path / name, seed=seed)
        write_char_tokenizer(models[name])
    results = tmp_path / "results"
    results.mkdir()
    env = {**two_node_cluster.env, "SSD_DEVICE": "cpu", "TP": "1", "MODEL_DIR": str(models["target"]),
           "DRAFT_DIR": str(models["draft"]), "SSD_BENCH_ARGS": "--numseqs 2 --output_len 8 --warmup 0 --ab ar,async",
           "RESULTS_DIR": str(results), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # the script's #SBATCH lines ask for a GPU node's resources: one CPU task per node instead
    argv = ["sbatch", "--wait", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
            "--gres=none", "--mem=1000M", "--time=10", f"--chdir={REPO}", f"--output={results / 'job-%j.out'}", str(TWO_NODE_SCRIPT)]
    try:
        proc = two_node_cluster.run(argv, timeout_s=JOB_TIMEOUT_S, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbatch --wait did not return in {JOB_TIMEOUT_S}s\n{job_logs(results)}\n"
                    f"{two_node_cluster.diagnostics()}")
    context = f"sbatch: {proc.stdout}{proc.stderr}\n{job_logs(results)}\n{two_node_cluster.diagnostics()}"
    assert proc.returncode == 0, f"two-node job failed (rc {proc.returncode})\n{context}"
    job_id = proc.stdout.strip().split(";")[0]
    for node in ("n1", "n2"):   # the job step (srun) started a task on each node
        assert f"launch task StepId={job_id}.0 " in two_node_cluster.slurmd_log(node), f"no task on {node}\n{context}"
    assert (results / "hostfile").read_text().split() == ["n1", "n2"], context
    result = json.loads((results / "two_node_tp1_async_k6_f3.json").read_text())
    assert result["ab"]["greedy_identical"] is True, context
    assert result["primary_arm"] == "async" and len(result["outputs"]) == 2, context
    assert all(len(o["token_ids"]) == 8 for o in result["outputs"]), context
    assert result["metrics"]["cache_hit_rate"] is not None, context   # the draft answered outcomes


# ---------------------------------------------------------------- the GPU scripts, without GPUs
# Each GPU sbatch script runs with a stub interpreter (records bench.py's argv) and, for the
# two-node script, stub scontrol/srun; the recorded command must parse with the real bench CLI.

STUB_PYTHON = """#!/bin/bash
if [[ "${1:-}" == bench/bench.py ]]; then printf '%s\\n' "$@" > "$RESULTS_DIR/argv"; fi
"""
STUB_SCONTROL = "#!/bin/bash\nprintf 'gpu-a\\ngpu-b\\n'\n"
STUB_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$RESULTS_DIR/srun_argv"
env | grep -E '^(MASTER_ADDR|MASTER_PORT|SLURM_HOSTFILE|NCCL_SOCKET_IFNAME)=' > "$RESULTS_DIR/srun_env"
"""
GPU_SCRIPTS = ("ssd_h100_llama70b.sbatch", "ssd_h100_qwen32b.sbatch", "ssd_ab.sbatch", "ssd_two_node.sbatch")


def write_stub(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def stub_env(tmp_path: Path, job_id: int | None = None, **env_overrides: str | None) -> dict[str, str]:
    """The environment of a job step with stub `python`/`scontrol`/`srun` first on PATH. An override
    of None removes the variable (e.g. SLURM_JOB_NODELIST=None: not inside a Slurm job)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_stub(bin_dir / "scontrol", STUB_SCONTROL)
    write_stub(bin_dir / "srun", STUB_SRUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SSD_", "MASTER_"))}
    env.pop("RESULTS_DIR", None)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SSD_REPO=str(REPO), RESULTS_DIR=str(tmp_path / "results"),
               PYTHON=str(write_stub(tmp_path / "python", STUB_PYTHON)), SLURM_JOB_NODELIST="gpu-[a-b]",
               SLURM_CPUS_PER_TASK="8")
    if job_id is not None:
        env["SLURM_JOB_ID"] = str(job_id)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_script(script: str | Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    path = script if isinstance(script, Path) else REPO / "scripts" / "slurm" / script
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=COMMAND_TIMEOUT_S)


def run_script_with_stubs(script: str, tmp_path: Path, job_id: int, **env_overrides) -> Path:
    env = stub_env(tmp_path, job_id, **env_overrides)
    proc = run_script(script, env, cwd=tmp_path)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return Path(env["RESULTS_DIR"])


def recorded_bench_argv(results: Path) -> list[str]:
    srun = results / "srun_argv"
    if srun.is_file():  # two-node: everything after the per-task wrapper's "$0"
        lines = srun.read_text().splitlines()
        lines = lines[lines.index("ssd-rank") + 1:]
        assert lines[0].endswith("python"), lines
        return lines[1:]
    return (results / "argv").read_text().splitlines()


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_builds_a_valid_bench_command(script: str, tmp_path: Path, monkeypatch):
    from ssd.benchmark import cli
    from ssd.benchmark.cli import parse_args
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 8)   # as on the GPU node the job runs on
    results = run_script_with_stubs(script, tmp_path, job_id=123456)
    argv = recorded_bench_argv(results)
    assert argv[0] == "bench/bench.py"
    # the device is explicit: bench.py's default (cuda if visible, else cpu) must not decide a GPU job
    assert argv.count("--device") == 1 and argv[argv.index("--device") + 1] == "cuda", argv
    config = parse_args(argv[1:])  # exits (SystemExit) if the CLI rejects it
    assert config.device == "cuda" and config.random_weights and argv[argv.index("--json") + 1].startswith(str(results))
    assert config.target_tp_size == config.gpus - 1, "the last GPU is the draft's"
    assert (results / "command.txt").is_file() and (results / "environment.txt").is_file()


def test_gpu_script_uses_real_checkpoints_when_given(tmp_path: Path):
    results = run_script_with_stubs("ssd_h100_llama70b.sbatch", tmp_path, job_id=7,
                                    MODEL_DIR="/ckpt/target", DRAFT_DIR="/ckpt/draft")
    argv = recorded_bench_argv(results)
    assert argv[argv.index("--target") + 1] == "/ckpt/target"
    assert argv[argv.index("--draft-path") + 1] == "/ckpt/draft"
    assert "--random-weights" not in argv and "--size" not in argv


def test_two_node_rendezvous_comes_from_slurm(tmp_path: Path):
    job_id = 987654
    results = run_script_with_stubs("ssd_two_node.sbatch", tmp_path, job_id=job_id)
    env = dict(line.split("=", 1) for line in (results / "srun_env").read_text().splitlines())
    assert env["MASTER_ADDR"] == "gpu-a"
    assert env["MASTER_PORT"] == str(10000 + job_id % 50000)
    assert Path(env["SLURM_HOSTFILE"]).read_text().split() == ["gpu-a"] * 4 + ["gpu-b"]
    srun = (results / "srun_argv").read_text().splitlines()
    assert "--ntasks=5" in srun and "--distribution=arbitrary" in srun


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_stops_at_once_where_no_gpu_is_visible(script: str, tmp_path: Path, monkeypatch, capsys):
    """With --device cuda in the command, a GPU job that sees no GPU (missing --gres, a CPU build of
    torch) is refused by bench.py's argument check in one line, instead of running on CPU."""
    from ssd.benchmark import cli
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 0)
    argv = recorded_bench_argv(run_script_with_stubs(script, tmp_path, job_id=5))
    with pytest.raises(SystemExit):
        cli.parse_args(argv[1:])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_two_node_cpu_mode_keeps_cpu(tmp_path: Path, monkeypatch):
    """SSD_DEVICE=cpu (what the two-node cluster test submits): --device cpu, --gpus = target ranks."""
    from ssd.benchmark import cli
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 0)
    results = run_script_with_stubs("ssd_two_node.sbatch", tmp_path, job_id=11, SSD_DEVICE="cpu", TP="1",
                                    MODEL_DIR="/ckpt/target", DRAFT_DIR="/ckpt/draft")
    argv = recorded_bench_argv(results)
    assert argv.count("--device") == 1 and argv[argv.index("--device") + 1] == "cpu", argv
    assert argv[argv.index("--gpus") + 1] == "1"
    assert "--ntasks=2" in (results / "srun_argv").read_text().splitlines()


def fake_repo(tmp_path: Path) -> Path:
    """A repository whose scripts/slurm is the real one (a symlink) and whose results/ starts absent:
    the scripts' default results directory ($SSD_REPO/results/...) lands here, not in the checkout."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "bench.py").write_text("")
    (repo / "scripts").mkdir()
    (repo / "scripts" / "slurm").symlink_to(REPO / "scripts" / "slurm")
    return repo


def assert_refused(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line message:\n{proc.stderr}"
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    for noise in ("unbound variable", "No such file or directory", ": line "):   # bash's own errors
        assert noise not in proc.stderr, proc.stderr


def test_two_node_script_outside_slurm_says_to_use_sbatch(tmp_path: Path):
    repo = fake_repo(tmp_path)
    env = stub_env(tmp_path, SSD_REPO=str(repo), RESULTS_DIR=None, SLURM_JOB_NODELIST=None,
                   SLURM_CPUS_PER_TASK=None)
    proc = run_script(repo / "scripts" / "slurm" / "ssd_two_node.sbatch", env, cwd=tmp_path)
    assert_refused(proc, "run it with sbatch", "node list")
    assert not (repo / "results").exists(), "a refused run created a results folder"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("script, overrides, phrase", [
    ("cpu_smoke.sbatch", {}, "TARGET_DIR"),
    ("ssd_h100_llama70b.sbatch", {"MODEL_DIR": "/ckpt/target"}, "DRAFT_DIR"),
    ("ssd_ab.sbatch", {"SSD_FAMILY": "mistral"}, "SSD_FAMILY=mistral"),
    ("ssd_h100_qwen32b.sbatch", {"SSD_BENCH_ARGS": '--b 8 --dataset "/data/unclosed'}, "SSD_BENCH_ARGS"),
    ("ssd_two_node.sbatch", {"SSD_DEVICE": "gpu"}, "SSD_DEVICE=gpu"),
    ("ssd_two_node.sbatch", {"TP": "four"}, "TP=four"),
])
def test_refused_start_creates_no_results_folder(script: str, overrides: dict, phrase: str, tmp_path: Path):
    """Inputs are validated before the results directory is created: a refused job leaves no empty
    results/<job id>/ (or results/local-<pid>/) in the repository."""
    repo = fake_repo(tmp_path)
    # by hand (default results/local-<pid>) and under Slurm (results/<job id>); the two-node script
    # run by hand is refused for that (test above)
    for job_id in (42,) if script == "ssd_two_node.sbatch" else (None, 42):
        env = stub_env(tmp_path, job_id, SSD_REPO=str(repo), RESULTS_DIR=None, **overrides)
        proc = run_script(repo / "scripts" / "slurm" / script, env, cwd=tmp_path)
        assert_refused(proc, phrase)
        assert not (repo / "results").exists(), f"{script} refused, but created {list((repo / 'results').iterdir())}"


def test_default_results_folder_is_created_once_valid(tmp_path: Path):
    repo = fake_repo(tmp_path)
    env = stub_env(tmp_path, 77, SSD_REPO=str(repo), RESULTS_DIR=None)
    proc = run_script(repo / "scripts" / "slurm" / "ssd_h100_llama70b.sbatch", env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (repo / "results" / "77" / "argv").is_file() and (repo / "results" / "77" / "command.txt").is_file()


@pytest.mark.parametrize("script", ["ssd_ab.sbatch", "ssd_two_node.sbatch"])
def test_qwen_family_gets_qwen_sizes(script: str, tmp_path: Path, monkeypatch):
    """SSD_FAMILY=qwen alone: Qwen3-32B + Qwen3-0.6B (the sizes follow the family), not llama's 70 / 1."""
    from ssd.benchmark import cli
    monkeypatch.setattr(cli, "_visible_gpu_count", lambda: 8)
    argv = recorded_bench_argv(run_script_with_stubs(script, tmp_path, job_id=3, SSD_FAMILY="qwen"))
    assert "--qwen" in argv and "--llama" not in argv
    assert argv[argv.index("--size") + 1] == "32" and argv[argv.index("--draft") + 1] == "0.6"
    config = cli.parse_args(argv[1:])
    assert (config.family, config.target.name, config.draft.name) == ("qwen", "qwen3-32b", "qwen3-0.6b")


def test_family_sizes_can_still_be_given(tmp_path: Path):
    argv = recorded_bench_argv(run_script_with_stubs("ssd_ab.sbatch", tmp_path, job_id=4, SSD_FAMILY="llama",
                                                     SSD_SIZE="8", SSD_DRAFT="1"))
    assert argv[argv.index("--size") + 1] == "8" and argv[argv.index("--draft") + 1] == "1"
    assert "--llama" in argv


def test_bench_args_are_split_like_a_shell(tmp_path: Path):
    """SSD_BENCH_ARGS: quotes keep a path with spaces one argument; nothing is expanded."""
    extra = """--b 8 --dataset "/data/my prompts.jsonl" --data-dir '/data/$HOME dir' --seed 3"""
    argv = recorded_bench_argv(run_script_with_stubs("ssd_h100_llama70b.sbatch", tmp_path, job_id=9,
                                                     SSD_BENCH_ARGS=extra))
    assert argv[-8:] == ["--b", "8", "--dataset", "/data/my prompts.jsonl", "--data-dir", "/data/$HOME dir",
                         "--seed", "3"], argv


def test_blank_bench_args_add_nothing(tmp_path: Path):
    argv = recorded_bench_argv(run_script_with_stubs("ssd_h100_llama70b.sbatch", tmp_path, job_id=10,
                                                     SSD_BENCH_ARGS="  "))
    assert "" not in argv and argv[-2] == "--json", argv


def test_script_run_from_another_directory_finds_common_sh(tmp_path: Path):
    """`bash /path/to/scripts/slurm/X.sbatch` from elsewhere, SSD_REPO unset: common.sh is found next
    to the script, and the repository from common.sh's own location."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = stub_env(tmp_path, 12, SSD_REPO=None)
    proc = run_script("ssd_h100_qwen32b.sbatch", env, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert recorded_bench_argv(Path(env["RESULTS_DIR"]))[0] == "bench/bench.py"


def spool_copy(tmp_path: Path, script: str) -> Path:
    """As sbatch runs it: a copy of the script in the spool directory, away from common.sh."""
    spool = tmp_path / "spool" / "job00012"
    spool.mkdir(parents=True)
    copy = spool / "slurm_script"
    shutil.copy(REPO / "scripts" / "slurm" / script, copy)
    return copy


def test_spool_copy_outside_the_repository_says_to_submit_from_the_root(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = stub_env(tmp_path, 12, SSD_REPO=None, SLURM_JOB_NAME="ssd-qwen32b")
    proc = run_script(spool_copy(tmp_path, "ssd_h100_qwen32b.sbatch"), env, cwd=elsewhere)
    assert_refused(proc, "ssd-qwen32b", "submit from the repository root", "SSD_REPO")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("how", ["working directory", "SLURM_SUBMIT_DIR"])
def test_spool_copy_finds_the_repository_from_the_job(how: str, tmp_path: Path):
    """Under sbatch the job starts in the submit directory (or --chdir); SLURM_SUBMIT_DIR is the
    fallback when --chdir pointed elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    overrides = {"SLURM_SUBMIT_DIR": str(REPO)} if how == "SLURM_SUBMIT_DIR" else {}
    env = stub_env(tmp_path, 12, SSD_REPO=None, **overrides)
    proc = run_script(spool_copy(tmp_path, "ssd_ab.sbatch"), env, cwd=REPO if how == "working directory" else elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert recorded_bench_argv(Path(env["RESULTS_DIR"]))[0] == "bench/bench.py"
