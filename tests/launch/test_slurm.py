"""The SLURM scripts on real SLURM clusters (loopback): `sbatch` of the unmodified
launch/pretrain_*.slurm with the tiny preset on CPU, then preemption by USR1 and requeue; and
launch/finetune_4b_k2.slurm continuing the pretraining job's checkpoint.

The reference is the single-node run (one node x 2 processes, torchrun). Every other run has the
same world size (2), data and config, so its per-step losses must equal the reference's: on two
fake nodes (2 x 1 process) this shows the rendezvous gave each node its rank; after a preemption
it shows the requeued job resumed from the saved step (a restart from scratch, or from another
step, would log other steps and losses).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
# The tiny preset on the CodeGen vocabulary, 2 ranks x 2 sequences of 32 tokens; the recipe's
# other fields (optimizer, schedule shape, ZeRO stage) come from launch/configs/pretrain.yaml.
TINY = ["--model.preset", "tiny", "--model.vocab_size", "50295", "--train.steps", str(STEPS),
        "--train.global_batch_tokens", "128", "--train.micro_batch_size", "2", "--schedule.warmup_steps", "4",
        "--train.eval_interval", "0", "--data.split", "100,0,0", "--checkpoint.interval", "1000",
        "--checkpoint.keep_last", "5", "--metrics.log_interval", "1", "--metrics.tensorboard", "false"]


@dataclass
class Run:
    rc: int
    log: str
    ckpt: Path
    metrics: list[dict]
    job: dict[str, str]

    def losses(self) -> dict[int, float]:
        return {m["step"]: m["loss/lm"] for m in self.metrics}


def run_job(cluster: SlurmCluster, script: str, nodes: int, nproc: int, workdir: Path, data: str,
            env: dict[str, str] | None = None, preempt_after_step: int | None = None) -> Run:
    """Submit the real script and wait for its end; optionally send USR1 to the batch shell (what
    `--signal=B:USR1@600` does before the time limit) once the run has logged that step."""
    ckpt, logs = workdir / "ckpt", workdir / "logs"
    logs.mkdir(parents=True)
    job_env = {"NPROC_PER_NODE": str(nproc), "CHECKPOINT_DIR": str(ckpt), "METRICS_DIR": str(workdir / "metrics"),
               "DATA_PREFIXES": data, "OMP_NUM_THREADS": "1", **(env or {})}
    # Site settings overridden the way a user would: no GPUs here, N nodes, logs elsewhere.
    job_id = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0",
                         f"--output={logs}/%x-%j.log", f"launch/{script}", *TINY, cwd=REPO, env=job_env).stdout.strip()
    if preempt_after_step is not None:
        _wait_for_step(cluster, job_id, logs, preempt_after_step)
        cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    job = cluster.wait(job_id, timeout=360)
    (log_file,) = logs.glob(f"*-{job_id}.log")
    metrics_file = workdir / "metrics" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return Run(int(job["ExitCode"].split(":")[0]), log_file.read_text(), ckpt, metrics, job)


def _wait_for_step(cluster: SlurmCluster, job_id: str, logs: Path, step: int) -> None:
    deadline = time.monotonic() + 180
    text = ""
    while time.monotonic() < deadline:
        text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
        if re.search(rf"^step {step}/{STEPS} ", text, re.M):
            return
        assert cluster.job_state(job_id)["JobState"] in ("PENDING", "RUNNING"), f"the job ended before step {step}:\n{text}"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} after 180 s:\n{text}\n{cluster.daemon_logs()}")


def complete_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in ckpt.glob("step_*/COMPLETE"))


@pytest.fixture(scope="module")
def reference(single_node_cluster, stdlib_data, tmp_path_factory) -> Run:
    return run_job(single_node_cluster, "pretrain_4b_k2.slurm", nodes=1, nproc=2,
                   workdir=tmp_path_factory.mktemp("reference"), data=stdlib_data)


def test_single_node_job_trains_to_the_end(reference):
    log = reference.log
    assert reference.rc == 0, log
    assert reference.job["JobState"] == "COMPLETED" and reference.job["Restarts"] == "0"
    assert re.search(r"\[launch\] .* job \d+ \(restart 0\) on 1 node\(s\) \[\S+\] x 2 processes, torchrun", log), log
    # The script's preset and the recipe YAML reach pretrain.py; the test's overrides come last.
    assert "--config launch/configs/pretrain.yaml --model.preset molm-350m-4b" in log
    assert "world 2, cpu" in log
    assert f"step {STEPS}/{STEPS} " in log
    assert [m["step"] for m in reference.metrics] == list(range(1, STEPS + 1))
    assert complete_steps(reference.ckpt) == [STEPS]
    assert (reference.ckpt / "latest").read_text().strip() == f"step_{STEPS:08d}"
    meta = json.loads((reference.ckpt / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert meta["layout"]["world_size"] == 2
    cfg = meta["config"]
    assert cfg["model"]["preset"] == "tiny" and cfg["model"]["n_layer"] == 2
    # The recipe YAML was read (ZeRO stage 2 is its setting, not the default) and holds the paper's values.
    assert cfg["parallel"]["zero_stage"] == 2
    assert (cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"], cfg["optimizer"]["grad_clip"]) == (3e-4, 0.01, 1.0)
    assert cfg["schedule"]["min_lr_ratio"] == 0.1


def check_preempted_and_resumed(run: Run, reference: Run) -> None:
    """One USR1: checkpoint at step N, requeue, the same job resumes at N and finishes like the reference."""
    log = run.log
    assert run.rc == 0, log
    assert run.job["JobState"] == "COMPLETED" and run.job["Restarts"] == "1", run.job
    saved = re.findall(r"preempted: checkpoint saved at step (\d+)", log)
    assert len(saved) == 1, log
    step = int(saved[0])
    assert 2 <= step < STEPS
    assert "caught SIGUSR1" in log and "requeueing job" in log and "(restart 1)" in log
    assert re.findall(r"resumed from \S+ at step (\d+)", log) == [str(step)]
    assert f"step {STEPS}/{STEPS} " in log
    assert complete_steps(run.ckpt) == [step, STEPS]
    # Every step logged exactly once across both runs of the job, with the reference's losses.
    assert [m["step"] for m in run.metrics] == list(range(1, STEPS + 1))
    assert run.losses() == pytest.approx(reference.losses(), rel=1e-6, abs=0)


def test_two_node_job_is_preempted_requeued_and_resumes(two_node_cluster, stdlib_data, reference, tmp_path):
    run = run_job(two_node_cluster, "pretrain_8b_k2.slurm", nodes=2, nproc=1, workdir=tmp_path, data=stdlib_data,
                  # The fake nodes' names (n1, n2) do not resolve; both run on this host.
                  env={"MASTER_ADDR": "127.0.0.1"}, preempt_after_step=3)
    assert re.search(r"on 2 node\(s\) \[n\[1-2\]\] x 1 processes, torchrun rendezvous 127\.0\.0\.1:", run.log), run.log
    assert "world 2, cpu" in run.log
    check_preempted_and_resumed(run, reference)


def test_single_node_deepspeed_launcher_is_preempted_requeued_and_resumes(single_node_cluster, stdlib_data,
                                                                           reference, tmp_path):
    run = run_job(single_node_cluster, "pretrain_4b_k4.slurm", nodes=1, nproc=2, workdir=tmp_path,
                  data=stdlib_data, env={"LAUNCHER": "deepspeed"}, preempt_after_step=3)
    assert "x 2 processes, deepspeed rendezvous" in run.log
    assert "--model.preset molm-700m-4b" in run.log
    check_preempted_and_resumed(run, reference)


def test_finetune_job_continues_the_pretraining_checkpoint(single_node_cluster, stdlib_data, reference, tmp_path):
    """launch/finetune_4b_k2.slurm on the same launcher body: the continual recipe from the
    reference pretraining job's checkpoint folder (INIT_FROM), two ranks."""
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {"NPROC_PER_NODE": "2", "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "METRICS_DIR": str(tmp_path / "metrics"),
           "DATA_PREFIXES": stdlib_data, "DATA_WEIGHTS": "1", "OMP_NUM_THREADS": "1",
           "INIT_FROM": str(reference.ckpt), "CONFIG": "launch/configs/finetune_continual.yaml"}
    job_id = single_node_cluster.run(
        "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--output={logs}/%x-%j.log",
        "launch/finetune_4b_k2.slurm", "--finetune.insert_mlp_experts", "2", "--train.steps", "3",
        "--train.global_batch_tokens", "128", "--train.micro_batch_size", "2", "--train.eval_interval", "0",
        "--data.split", "100,0,0", "--metrics.log_interval", "1", "--metrics.tensorboard", "false",
        cwd=REPO, env=env).stdout.strip()
    job = single_node_cluster.wait(job_id, timeout=360)
    (log_file,) = logs.glob(f"*-{job_id}.log")
    log = log_file.read_text()
    assert int(job["ExitCode"].split(":")[0]) == 0, log
    assert (f"[launch] finetune.py --config launch/configs/finetune_continual.yaml --checkpoint.dir {tmp_path / 'ckpt'}"
            in log), log
    assert "trainable parameters" in log and "world 2, cpu" in log
    metrics = [json.loads(line) for line in (tmp_path / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and "experts/layer0.mlpf/new_share" in metrics[-1]
    assert complete_steps(tmp_path / "ckpt") == [3]
