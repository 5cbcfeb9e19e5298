"""The cluster definitions under cluster/ are checked the way their tools would check them:
the launcher YAML against Ray's own schema, the KubeRay manifests for the fields the operator and
this project rely on, the SLURM script with bash itself."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess

import pytest
import yaml

from pipeline.config import compose, validate
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"


def test_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"] if "--head" in c)
    cfg["available_node_types"]["gpu_worker"]["min_workerz"] = 1  # the check is real: a typo fails
    with pytest.raises(Exception, match="min_workerz"):
        validate_config(prepare_config(cfg))


@pytest.mark.skipif(not shutil.which("rsync"), reason="rsync is not installed")
def test_launcher_rsync_keeps_the_library_and_drops_the_artifacts(tmp_path):
    """`ray up` copies the checkout with rsync and the YAML's rsync_exclude (Ray's own argument
    builder, real rsync): the top-level data, models and export folders stay behind, the
    library's packages of the same names (pipeline/data, ...) travel."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    src, dst = tmp_path / "src", tmp_path / "dst"
    for name in ("data", "models", "export", ".venv", "runs"):
        for folder in (src / name, src / "pipeline" / name):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "f").write_text(name)
    args = SSHCommandRunner._create_rsync_filter_args(None, {"rsync_exclude": cfg["rsync_exclude"]})
    subprocess.run(["rsync", "-a", *args, f"{src}/", str(dst)], check=True)
    for name in ("data", "models", "export", ".venv", "runs"):
        assert (dst / "pipeline" / name / "f").is_file(), f"pipeline/{name} was not copied"
        assert not (dst / name).exists(), f"{name}/ was copied"


def _pods(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests(name):
    import ray

    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == ("RayCluster" if name == "raycluster.yaml" else "RayJob")
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    base = re.search(r"FROM rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text()).group(1)
    assert spec["rayVersion"] == base == ray.__version__  # image, manifest and the tested Ray agree
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # the Jobs API is never exposed
    # the operator's requests and its autoscaler carry the token (its Secret key is auth_token)
    assert spec["authOptions"] == {"mode": "token", "secretName": "ray-auth"}
    for pod in _pods(doc):
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-auth", "key": "auth_token"}
        assert container["resources"]["limits"]
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "4"
    if doc["kind"] == "RayJob":
        assert "dvc repro" in doc["spec"]["entrypoint"] and doc["spec"]["shutdownAfterJobFinishes"]
        overrides = re.search(r"pipeline compose ([^&\"]+)", doc["spec"]["entrypoint"]).group(1).split()
    else:
        overrides = ["cluster=remote"]  # what the README has users compose for it
    # Ray Train's workers (cpus_per_worker CPUs and one GPU each) must fit the worker pods as Ray
    # places them (a worker never spans pods; the head runs none: num-cpus 0)
    cluster = validate(compose(ROOT / "configs", overrides)).cluster
    pods = [(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]),
             int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]))
            for g in spec["workerGroupSpecs"] for _ in range(g["replicas"])]
    fit = sum(min(cpus // cluster.cpus_per_worker, gpus) for cpus, gpus in pods)
    assert fit >= cluster.num_workers, f"{name}: {cluster.num_workers} workers of {cluster.cpus_per_worker} CPUs " \
        f"and 1 GPU do not fit the worker pods {pods} (room for {fit})"


def test_remote_cluster_config_composes():
    cfg = validate(compose(ROOT / "configs", ["cluster=remote", "cluster.num_workers=8"]))
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers == 8 and cfg.cluster.address == "auto"


def test_slurm_script_is_valid_bash_and_refuses_to_run_outside_sbatch(tmp_path):
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm.sh")], check=True)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(CLUSTER / "slurm.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert proc.returncode != 0 and "run this through sbatch" in proc.stderr
