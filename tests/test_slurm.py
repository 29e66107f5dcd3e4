"""slurm/train.sbatch and `flip-ds slurm` on a real Slurm cluster: real sbatch, srun, signals,
requeues and dependency chains, training the tiny model under ZeRO-3 on CPU ranks over gloo.

CI starts the cluster (slurm/local_cluster.sh up; two slurmd "nodes" on one host) and exports
SLURM_CONF; without SLURM_CONF these tests skip. The 1-rank runs are submitted first and train in
the background; the 2-rank runs go one at a time (two gloo jobs on two cores slow each other's
collectives to a crawl). What the scheduler or an operator does to a run while it trains (signal
it, give a requeued job more time, stop a job of a chain) is done by the test, or by a driver
thread for the background run that needs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.distributed_helpers import REPO, scalars

pytestmark = pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                                reason="no Slurm cluster: run `slurm/local_cluster.sh up` and eval its `env` output")

G = 16  # global batch
SHORT = (24, 4)  # masked, unmasked steps: the 2-rank runs
# The time-limit run (and its 1-rank reference) must still be training when the warning arrives,
# which Slurm sends at its next periodic check (every 30 s): longer, logged every 10 steps.
LONG = (500, 4)


def recipe(demo, out: Path, steps: tuple[int, int], ranks: int) -> list[str]:
    """Dotted overrides of configs/tiny_cpu.yaml: the test's small dataset, `steps` per phase, ZeRO-3 with
    activation checkpointing pinned (the recipe's own stage is auto, ZeRO-1 here) so that the multi-node
    runs exercise partitioned weights."""
    return [f"output_dir={out}", f"data.train=[{{shards: '{demo.train}'}}]", f"data.tokenizer={demo.tokenizer}",
            "train.deepspeed=ds_configs/zero3.json", "model.activation_checkpointing=true",
            "data.workers=0", "data.sample_shuffle=64", f"train.global_batch={G}", f"train.micro_batch={G // ranks}",
            f"phases.0.samples={steps[0] * G}", f"phases.0.warmup_samples={2 * G}",
            f"phases.1.samples={steps[1] * G}", "phases.1.warmup_samples=0", "checkpoint.every_samples=0",
            f"logging.every_steps={1 if steps == SHORT else 10}", "logging.masked_image_grid=false", "eval.sets=[]"]


def slurm_cli(*args: str, cpus_per_task: str | None = "1") -> subprocess.CompletedProcess:
    """`flip-ds slurm` on the tiny recipe; one CPU a task unless told (the default, a node's CPUs shared
    by its tasks, would let this cluster run only one job per node at a time)."""
    cpus = ["--cpus-per-task", cpus_per_task] if cpus_per_task else []
    return subprocess.run([sys.executable, "-m", "flip_ds", "slurm", "--config", "configs/tiny_cpu.yaml",
                           "--gpus-per-node", "0", *cpus, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@dataclass
class Job:
    id: str
    out: Path  # the run's output_dir

    @property
    def log(self) -> Path:
        return next((self.out / "slurm").glob(f"*-{self.id}.out"))

    def text(self) -> str:
        try:
            return self.log.read_text()
        except StopIteration:
            return ""

    def info(self) -> dict[str, str]:
        return job_info(self.id)

    def wait(self, until, what: str, timeout: float = 600):
        deadline = time.time() + timeout
        while True:
            result = until()
            if result:
                return result
            assert time.time() < deadline, f"job {self.id}: no {what} after {timeout} s; {self.info()}\n{self.text()}"
            time.sleep(0.3)

    def finished(self, timeout: float = 600) -> dict[str, str]:
        def ended():
            info = self.info()
            return info if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING",
                                                    "REQUEUED", "REQUEUE_HOLD", "SUSPENDED") else None
        return self.wait(ended, "end", timeout)

    def steps_logged(self) -> int:
        return max((int(s) for s in re.findall(r"\| step (\d+)/", self.text())), default=0)

    def stopped_at(self) -> int:
        """The step at which the training stopped on a signal (the step the rerun resumes at)."""
        return int(re.search(r"stopped by signal \d+ at step (\d+)", self.text()).group(1))

    def preempt(self) -> None:
        subprocess.run(["scancel", "--batch", "--signal=USR1", self.id], check=True)

    def update_when_requeued(self, *updates: str) -> None:
        """Once the job is queued again after a requeue, apply `updates` (e.g. TimeLimit=60) before it
        restarts: the test cluster holds a requeued job for 11 s (cred_expire=10), real ones ~2 min."""
        self.wait(lambda: (int(self.info()["Restarts"]) >= 1 and self.info()["JobState"] == "PENDING"), "requeue")
        subprocess.run(["scontrol", "update", f"JobId={self.id}", *updates], check=True)


@dataclass
class Run:
    out: Path  # the run's output_dir
    jobs: list[Job]
    error: BaseException | None = field(default=None, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    def drive(self, action: Callable[[Run], None]) -> None:
        """Do `action(self)` in a thread while the other tests go on, as an operator would."""
        def act() -> None:
            try:
                action(self)
            except BaseException as e:  # reported by driven()
                self.error = e

        self.thread = threading.Thread(target=act, daemon=True)
        self.thread.start()

    def driven(self) -> Run:
        """The run once its driver is done; the driver's failure, if any, fails the caller."""
        if self.thread:
            self.thread.join(900)
            assert not self.thread.is_alive(), "driver still running"
        if self.error:
            raise self.error
        return self


def submit(out: Path, *args: str) -> list[Job]:
    done = slurm_cli(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = re.search(r"submitted job\(s\) ([\d ]+);", done.stdout).group(1).split()
    return [Job(i, out) for i in ids]


def give_the_rerun_time(run: Run) -> None:
    """The warning of this run's 5-minute limit is due 50 s in; once the job has checkpointed and
    requeued itself, its rerun gets the time to finish."""
    run.jobs[0].update_when_requeued("TimeLimit=60")


def final(out: Path) -> tuple[float, float]:
    """(samples seen, loss) of the last step logged to TensorBoard."""
    loss = scalars(out / "tensorboard", "train/loss")
    samples = scalars(out / "tensorboard", "train/samples_seen")
    last = max(loss)
    return samples[last], loss[last]


ONE_NODE, TWO_NODES, ONE_RANK = (["--nodes", "1", "--tasks-per-node", "2"], ["--nodes", "2", "--tasks-per-node", "1"],
                                 ["--nodes", "1", "--tasks-per-node", "1"])


def start(out: Path, name: str, layout: list[str], demo, steps: tuple[int, int], *extra: str) -> Run:
    ranks = int(layout[layout.index("--tasks-per-node") + 1]) * int(layout[layout.index("--nodes") + 1])
    return Run(out, submit(out, *layout, "--job-name", name, *recipe(demo, out, steps, ranks), *extra))


@pytest.fixture(scope="module")
def background(demo_shards, tmp_path_factory) -> dict[str, Run]:
    """The 1-rank runs, submitted together first."""
    runs = {"long_reference": start(tmp_path_factory.mktemp("long_reference"), "long_reference", ONE_RANK,
                                    demo_shards, LONG),
            # the warning is due 50 s in (250 s before a 5-minute limit), when the batch script is surely
            # running: Slurm sends it once, at its first check after that, and a warning that finds
            # the script not started yet is lost (one was, on a loaded host, with 290 s)
            "time_limit": start(tmp_path_factory.mktemp("time_limit"), "time_limit",
                                ONE_RANK + ["--time", "5", "--signal-seconds", "250"], demo_shards, LONG),
            # a tokenizer file that exists but is not a SentencePiece model: only the training tasks find out
            "failing": start(tmp_path_factory.mktemp("failing"), "failing", ONE_RANK + ["--chain", "2"],
                             demo_shards, SHORT, f"data.tokenizer={REPO / 'configs' / 'tiny_cpu.yaml'}")}
    runs["time_limit"].drive(give_the_rerun_time)
    return runs


@pytest.fixture(scope="module")
def one_node(background, demo_shards, tmp_path_factory) -> Run:
    """The 2-rank reference: 1 node x 2 tasks, uninterrupted, finished."""
    run = start(tmp_path_factory.mktemp("one_node"), "one_node", ONE_NODE, demo_shards, SHORT)
    run.jobs[0].finished()
    return run


def assert_ended(job: Job, state: str, exit_code: str, restarts: int) -> dict[str, str]:
    info = job.finished()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == (state, exit_code, str(restarts)), (
        info, job.text())
    # the batch script's copy of srun's errors (one per start of the job) is gone once it has ended
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"flip-ds-srun-{job.id}.*"))
    return info


def test_one_node_two_tasks_trains_under_zero3_and_completes(one_node):
    info = assert_ended(one_node.jobs[0], "COMPLETED", "0:0", 0)
    assert (info["NumNodes"], info["NumTasks"], info["Requeue"]) == ("1", "2", "1")  # --requeue from the template
    log = one_node.jobs[0].text()
    assert "training tiny on 2 rank(s)" in log
    assert re.search(r"\| step \d+/\d+ \| samples \d+ .*\| loss \d+\.\d+", log)
    # ZeRO-3 writes one model-state shard per rank (stages 1-2 write a single mp_rank_00 file)
    last = one_node.out / "checkpoints" / (one_node.out / "checkpoints" / "latest").read_text().strip()
    assert {p.name for p in last.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"}
    assert final(one_node.out)[0] == sum(SHORT) * G


def test_two_nodes_preempted_by_usr1_requeue_resume_match_one_node_and_end_their_chain(one_node, demo_shards,
                                                                                       tmp_path):
    """2 nodes x 1 task, preempted after a few steps by USR1 to the batch script (what Slurm's
    --signal=B:USR1 does before a time limit): the run checkpoints, requeues itself, resumes and
    completes with the same samples seen and final loss as the uninterrupted 1-node run (same ranks,
    data and seeds). The job chained after it waits through the requeue and is cancelled at the end."""
    run = start(tmp_path, "two_nodes", TWO_NODES + ["--chain", "2"], demo_shards, SHORT)
    job, chained = run.jobs
    job.wait(lambda: job.steps_logged() >= 3, "training steps")
    job.preempt()
    info = assert_ended(job, "COMPLETED", "0:0", 1)  # requeued by the job, restarted by Slurm
    assert (info["NumNodes"], info["NumTasks"]) == ("2", "2")
    log = job.text()
    assert "training tiny on 2 rank(s)" in log and "2 node(s) x 1 task(s)" in log
    assert "USR1: asking the training tasks to save a checkpoint" in log
    stopped = job.stopped_at()
    assert 3 <= stopped < sum(SHORT)
    assert f"requeueing job {job.id} (restart 1)" in log
    assert f"at step {stopped} ({stopped * G} samples)" in log.split("resumed from")[1]
    assert final(run.out)[0] == sum(SHORT) * G
    assert final(run.out) == final(one_node.out)  # the same samples seen, the same final loss
    # a finished run cancels the jobs chained after it instead of letting them start for nothing
    assert f"cancelling the jobs chained after this one: {chained.id}" in log
    assert chained.finished()["JobState"] == "CANCELLED"


def training_task_pid(out: Path, rank: int) -> int | None:
    """The PID of the training task of `rank` (a python process, not srun or the batch script) of the run in `out`."""
    found = subprocess.run(["pgrep", "-f", "--", f"-m flip_ds train .*output_dir={out} "], capture_output=True,
                           text=True)
    for pid in found.stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_PROCID={rank}".encode() in environ and Path(cmdline[0].decode()).name.startswith("python"):
            return int(pid)
    return None


def test_a_task_killed_mid_run_is_requeued_resumes_and_matches_one_node(one_node, demo_shards, tmp_path):
    """kill -9 of one task (a crashed process, an OOM kill): the other rank's next collective fails
    after train.comm_timeout_s, the job requeues itself (not a recipe error), resumes from its last
    checkpoint and completes with the uninterrupted run's samples and final loss; the node of the
    failure is kept out of the job chained after it."""
    run = start(tmp_path, "killed", ONE_NODE + ["--chain", "2"], demo_shards, SHORT, "train.comm_timeout_s=20",
                f"checkpoint.every_samples={4 * G}")
    job, chained = run.jobs
    job.wait(lambda: job.steps_logged() >= 6, "training steps after the first checkpoint")
    node = job.info()["NodeList"]
    os.kill(job.wait(lambda: training_task_pid(run.out, 1), "rank 1's process"), 9)
    info = assert_ended(job, "COMPLETED", "0:0", 1)
    log = job.text()
    assert re.search(rf"training failed with status \d+ \(first failure on node {node}\)", log), log
    assert f"requeueing job {job.id} after the failure (restart 1 of at most 100)" in log
    assert "resumed from" in log.split("after the failure")[1]
    assert final(run.out) == final(one_node.out)  # the same samples seen, the same final loss
    assert f"excluding node {node} from chained job {chained.id} (ExcNodeList={node})" in log
    assert chained.info()["ExcNodeList"] == node and chained.finished()["JobState"] == "CANCELLED"
    assert info["Restarts"] == "1"


def test_a_chain_of_three_jobs_completes_what_each_job_alone_cannot(one_node, demo_shards, tmp_path):
    run = start(tmp_path, "chain", ONE_NODE + ["--chain", "3", "--max-restarts", "0"], demo_shards, SHORT)
    resumed_at = 0
    for job in run.jobs[:2]:  # each stopped mid-run, as its time limit would, and not requeued
        job.wait(lambda j=job, s=resumed_at: j.steps_logged() >= s + 3, "training steps")
        job.preempt()
        assert_ended(job, "FAILED", "75:0", 0)
        log = job.text()
        assert "not requeueing: restarted 0 times (FLIP_MAX_RESTARTS=0)" in log
        assert resumed_at + 3 <= job.stopped_at() < sum(SHORT)
        if resumed_at:
            assert f"at step {resumed_at} ({resumed_at * G} samples)" in log
        resumed_at = job.stopped_at()
    assert_ended(run.jobs[2], "COMPLETED", "0:0", 0)
    assert f"at step {resumed_at} ({resumed_at * G} samples)" in run.jobs[2].text()
    assert final(run.out) == final(one_node.out)


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(background):
    run = background["time_limit"].driven()
    job = run.jobs[0]
    assert_ended(job, "COMPLETED", "0:0", 1)
    log = job.text()
    assert "USR1: asking the training tasks to save a checkpoint" in log and "DUE TO TIME LIMIT" not in log
    stopped = job.stopped_at()
    assert f"requeueing job {job.id} (restart 1)" in log
    assert f"at step {stopped} ({stopped * G} samples)" in log.split("resumed from")[1]
    reference = background["long_reference"]
    assert_ended(reference.jobs[0], "COMPLETED", "0:0", 0)
    assert final(run.out)[0] == sum(LONG) * G
    assert final(run.out) == final(reference.out)


def test_a_failed_run_is_not_requeued_and_cancels_its_chain(background):
    first, second = background["failing"].jobs
    info = first.finished()
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("FAILED", "0", "2:0"), info
    log = first.text()
    assert "not requeueing: a rerun would fail the same way" in log and "requeueing job" not in log
    assert f"cancelling the jobs chained after this one: {second.id}" in log
    assert second.finished()["JobState"] == "CANCELLED"


def test_plain_sbatch_of_a_recipe_that_cannot_run_stops_before_srun(demo_shards, tmp_path):
    out = tmp_path / "bad"
    (out / "slurm").mkdir(parents=True)
    args = recipe(demo_shards, out, SHORT, 2)
    done = subprocess.run(["sbatch", "--parsable", "--job-name=bad", "--ntasks-per-node=2",
                           f"--output={out / 'slurm' / '%x-%j.out'}", f"--export=ALL,FLIP_PYTHON={sys.executable}",
                           "slurm/train.sbatch", "configs/tiny_cpu.yaml", *args, "train.global_batch=24"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    job = Job(done.stdout.strip(), out)
    info = job.finished(timeout=300)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), info
    log = job.text()
    assert "train.global_batch: 24 is not a multiple of micro_batch 8 x world size 2" in log
    assert "does not run on 2 ranks" in log and "] training " not in log


def test_a_recipe_that_cannot_run_fails_at_submission_and_queues_nothing(demo_shards, tmp_path):
    out = tmp_path / "refused"
    args = recipe(demo_shards, out, SHORT, 2)
    for layout, extra, error in (
            (["--tasks-per-node", "2"], ["train.bogus=1"], "unknown key 'train.bogus'; TrainConfig has: "),
            (["--tasks-per-node", "3"], [], "train.global_batch: 16 is not a multiple of micro_batch 8 x world size 3"),
    ):
        done = slurm_cli("--nodes", "1", *layout, "--job-name", "refused", *args, *extra)
        assert done.returncode == 2, done.stdout + done.stderr
        (line,) = done.stderr.strip().splitlines()  # one line naming the cause
        assert line.startswith(f"flip-ds: error: {error}")
    queued = subprocess.run(["squeue", "-h", "-n", "refused"], capture_output=True, text=True, check=True).stdout
    assert queued == "" and not out.exists()


def test_cpus_per_task_defaults_to_the_nodes_cpus_shared_by_their_tasks():
    listed = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout
    cpus = min(int(c) for c in listed.split())  # 8 on the test cluster
    done = slurm_cli("--nodes", "1", "--tasks-per-node", "2", "--dry-run", cpus_per_task=None)
    assert done.returncode == 0, done.stderr
    assert f"--cpus-per-task={cpus // 2}" in done.stdout.splitlines()[1]
