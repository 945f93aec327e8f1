"""cluster/: the Ray launcher YAML against Ray's own schema, the KubeRay RayJob, and both SLURM
scripts run with stub commands, their restore command lines parsed by the real parsers."""
import argparse
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _ray_restore_args(argv):
    """Parse ``ray-restore`` flags with the parser the command uses."""
    from deqir_dist.apps.ray_restore import _add_arguments
    p = argparse.ArgumentParser()
    _add_arguments(p)
    return p.parse_args(argv)


def _after(tokens, script):
    return tokens[[i for i, t in enumerate(tokens) if t.endswith(script)][0] + 1:]


def _ray_version():
    ray = pytest.importorskip("ray")
    return ray.__version__


# ------------------------------------------------------------------------------------ Ray launcher


def test_aws_cluster_yaml_matches_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray = pytest.importorskip("ray")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == f"rayproject/ray:{_ray_version()}-py312-gpu"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert {v["resources"]["GPU"] for v in gpu_types.values()} == {1, 8}      # throughput and gangs
    assert sum(v.get("max_workers", 0) for v in gpu_types.values()) <= cfg["max_workers"]
    assert any("deqir-dist[ray]" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    # the job command in the header parses with the real flags
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    cmd = " ".join(ln.lstrip("# ").rstrip("\\") for ln in text.splitlines()[:10])
    cmd = cmd[cmd.index("python launch/ray_restore.py"):].split('"')[0]
    args = _ray_restore_args(_after(shlex.split(cmd), "launch/ray_restore.py"))
    assert (args.address, args.device, args.workers) == ("auto", "cuda", 4)


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    args = _ray_restore_args(_after(shlex.split(spec["entrypoint"]), "launch/ray_restore.py"))
    assert args.address == "auto" and args.device == "cuda" and args.out == "/data/restored"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_version()
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert "/data" in mounts                                # the driver reads and writes the data
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["image"] == head["containers"][0]["image"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    docker = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_ray_version()}-py312-gpu" in docker and "[ray]" in docker


# ------------------------------------------------------------------------------------ SLURM


STUBS = {
    "scontrol": 'print("node1\\nnode2")',
    "hostname": 'print("10.0.0.7")',
    "sleep": "pass",
    "ray": "log()",
    "torchrun": "log()",
    # python: the readiness probe (-c) reports plenty of GPUs; anything else is logged
    "python": 'print(10**6) if sys.argv[1:2] == ["-c"] else log()',
    # srun: drop its options (-w takes a value), then run the command
    "srun": ("log(); a = sys.argv[1:]\n"
             "while a and a[0].startswith('-'):\n"
             "    a = a[2:] if a[0] == '-w' else a[1:]\n"
             "os.execvp(a[0], a)"),
}


@pytest.fixture()
def stub_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        f = bin_dir / name
        f.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                     f"def log():\n    open(os.environ['STUB_LOG'], 'a').write(json.dumps(sys.argv) + '\\n')\n"
                     f"{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_sbatch(script, stub_path, tmp_path, *args, env=None):
    log = tmp_path / "calls.jsonl"
    e = {"PATH": f"{stub_path}:/usr/bin:/bin", "STUB_LOG": str(log), "SLURM_JOB_NODELIST": "node[1-2]",
         "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "a100:8",
         "SLURM_CPUS_PER_TASK": "64", **(env or {})}
    r = subprocess.run(["bash", str(CLUSTER / script), *args], env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return [[Path(c[0]).name, *c[1:]] for c in calls]


def test_slurm_ray_script_starts_cluster_and_submits(stub_path, tmp_path):
    lines = (CLUSTER / "slurm-ray.sbatch").read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --gpus-per-node=8" in lines
    calls = _run_sbatch("slurm-ray.sbatch", stub_path, tmp_path, "in/", "out/", "--steps", "50",
                        env={"TASK_FLAGS": "--task inpaint --mask box", "GPUS_PER_WORKER": "2"})
    starts = [c for c in calls if c[:2] == ["ray", "start"]]
    # both are started in the background and the stubbed sleep returns at once: either may log first
    (head,) = [c for c in starts if "--head" in c]
    (worker,) = [c for c in starts if c is not head]
    assert "--num-gpus=8" in head and "--address=10.0.0.7:6379" in worker and "--num-gpus=8" in worker
    (job,) = [c for c in calls if c[0] == "python"]
    args = _ray_restore_args(_after(job, "launch/ray_restore.py"))
    assert (args.input, args.out, args.task, args.mask, args.steps) == ("in/", "out/", "inpaint", "box", 50)
    assert (args.address, args.device, args.gpus_per_worker) == ("10.0.0.7:6379", "cuda", 2)


def test_slurm_torchrun_script(stub_path, tmp_path):
    calls = _run_sbatch("slurm-torchrun.sbatch", stub_path, tmp_path, "lr/", "restored/")
    (tr,) = [c for c in calls if c[0] == "torchrun"]
    opts = dict(zip(tr[1:11:2], tr[2:11:2]))
    assert opts == {"--nnodes": "2", "--nproc_per_node": "8", "--rdzv-id": "4242", "--rdzv-backend": "c10d",
                    "--rdzv-endpoint": "node1:29500"}
    assert tr[11] == "launch/restore.py"
    from deqir_dist.apps.cli import build_parser
    args = build_parser().parse_args(["restore", "--distributed", *tr[12:]])   # what launch/restore.py runs
    assert args.inputs == ["lr/"] and args.out == "restored/" and args.task == "sr_bicubic" and args.scale == 4
    assert args.distributed and args.steps == 100


def test_launcher_is_thin():
    text = (ROOT / "launch" / "ray_restore.py").read_text()
    assert "from deqir_dist.apps.cli import main" in text
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "ray_restore.py"), "--help"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "--gpus-per-worker" in r.stdout and "--images-per-batch" in r.stdout
