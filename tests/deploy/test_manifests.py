"""deploy/: every overlay (and each component on top) renders with `kubectl kustomize`, passes
kubernetes-validate --strict, and agrees with the servers it runs: mrl-serve's own parser reads the
Deployment's settings, a real mrl-serve started with them exports the autoscaler's metric, a real
tritonserver takes the Triton overlay's arguments, and probes, ports, grace and images line up."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mrl.serving.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: cannot render the manifests")
# The oldest Kubernetes these manifests are written for (gRPC probes, the preStop sleep action) and the newest
# whose schemas kubernetes-validate ships.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# What is deployed: each overlay, and components on top of the mrl-serve ones.
SETUPS = {
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "triton": ("overlays/triton", ()),
    "cpu+tls": ("overlays/cpu", ("tls",)),
    "cpu+baked-model": ("overlays/cpu", ("baked-model",)),
    "gpu+tls+baked-model": ("overlays/gpu", ("tls", "baked-model")),
}
MRL_SERVE_SETUPS = [name for name in SETUPS if not name.startswith("triton")]


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIRECTORY`, as documents."""
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(setup: str, images: list[dict] | None = None) -> list[dict]:
    """The manifests of one setup: an overlay, with components (and images) set by a kustomization of our own,
    as a user's is in docs/deploy.md."""
    overlay, components = SETUPS[setup]
    if not components and not images:
        return kustomize(DEPLOY / overlay)
    with tempfile.TemporaryDirectory() as tmp:  # kustomize takes only relative paths to other directories
        kustomization = {
            "resources": [os.path.relpath(DEPLOY / overlay, tmp)],
            "components": [os.path.relpath(DEPLOY / "components" / c, tmp) for c in components],
            "images": images or [],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return kustomize(Path(tmp))


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def server_container(docs: list[dict]) -> dict:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def environment(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_every_setup_renders_and_validates_strictly(setup):
    _, docs = setup
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"} <= set(kinds)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships; test_service_monitor_scrapes_the_metrics_port checks it
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field


def test_the_model_loader_validates_and_mounts_the_models_claim():
    docs = kustomize(DEPLOY / "tools" / "model-loader")
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    (volume,) = one(docs, "Pod")["spec"]["volumes"]
    claim = one(render("cpu"), "PersistentVolumeClaim")
    assert one(docs, "PersistentVolumeClaim") == claim  # the very claim the servers mount
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}  # writable, unlike theirs


def test_a_users_kustomization_names_its_image_over_an_overlay():
    for setup, name in (("cpu+baked-model", "mrl-serve"), ("gpu", "mrl-serve"), ("triton", "mrl-triton")):
        mine = [{"name": name, "newName": f"registry.example.com/team/{name}", "newTag": "mine"}]
        assert server_container(render(setup, mine))["image"] == f"registry.example.com/team/{name}:mine", setup


def test_a_bad_manifest_fails_validation():
    deployment = one(render("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", MRL_SERVE_SETUPS)
def test_mrl_serve_reads_the_deployment_as_the_probes_and_services_expect(name, capsys):
    docs = render(name)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(docs)
    env = environment(container)
    args = parse_args(container.get("args", []), environ=env)
    assert "no flag reads it" not in capsys.readouterr().err  # every MRL_SERVE_* variable is a real setting
    assert args.host == "0.0.0.0"  # the kubelet probes the pod's address, not loopback
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "http": args.http_port, "metrics": args.metrics_port}
    tls = args.tls_cert is not None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        if tls:  # kubelet gRPC probes cannot speak TLS: HTTPS /health, which answers as gRPC health does
            assert spec["httpGet"] == {"path": "/health", "port": args.http_port, "scheme": "HTTPS"}, probe
        else:
            assert spec["grpc"] == {"port": args.port}, probe  # service "": the whole server
    # Drain: SIGTERM comes after preStop; the drain takes at most --shutdown-grace-s; SIGKILL only after both,
    # and liveness never fails for long enough to restart a draining server.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.shutdown_grace_s
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pre_stop + args.shutdown_grace_s
    # Files the flags name lie on the container's mounts.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in [*(a.partition("=")[2] or a for a in args.artifacts), args.auth_token_file, args.tls_cert]:
        if path is not None:
            assert any(Path(path).is_relative_to(m) for m in mounts) or "baked" in name, path
    # Threads from the CPU limit: the container sees every core of the node.
    cpus = float(container["resources"]["limits"]["cpu"])
    assert args.intra_op_threads is not None and args.intra_op_threads * args.batch_workers <= cpus
    assert args.lone_batch_threads is not None and args.lone_batch_threads <= cpus
    assert pod["enableServiceLinks"] is False  # a Service named mrl-serve-http would set MRL_SERVE_HTTP_PORT


@pytest.mark.parametrize("name", list(SETUPS))
def test_services_pdb_and_autoscaler_point_at_the_pods(name):
    docs = render(name)
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = server_container(docs)
    port_names = {p["name"] for p in container["ports"]}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, port
    grpc_services = [s for s in services.values() if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
    assert [s["spec"].get("clusterIP") for s in grpc_services] == ["None"]  # headless: balancing per call
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert hpa["spec"]["minReplicas"] >= 2  # the disruption budget can then evict one at a time


def test_service_monitor_scrapes_the_metrics_port(setup):
    _, docs = setup
    monitor = one(docs, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [d for d in docs if d["kind"] == "Service" and wanted <= d["metadata"]["labels"].items()]
    assert len(selected) == 1, "the ServiceMonitor must select exactly one Service"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_pods_run_as_the_images_user_on_a_read_only_root(setup):
    name, docs = setup
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    image = "triton" if name == "triton" else "gpu" if name.startswith("gpu") else "cpu"
    containerfile = (DEPLOY / "containers" / f"{image}.Containerfile").read_text()
    user = re.search(r"(?m)^USER (\d+):(\d+)$", containerfile)
    assert user, f"{image}.Containerfile has no numeric USER"
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == tuple(map(int, user.groups()))
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    exposed = re.search(r"(?m)^EXPOSE (.+)$", containerfile).group(1)
    if name != "triton":  # the image's defaults are the Deployment's ports
        assert sorted(map(int, exposed.split())) == sorted(p["containerPort"] for p in container["ports"])


def adapter_metrics() -> set[str]:
    """The metric names the Prometheus adapter's rules serve to the autoscaler."""
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    return {rule["name"]["as"] for rule in values["rules"]["custom"]}


def metric_names(text: str) -> set[str]:
    """Names of the samples in a Prometheus text exposition."""
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0) for line in text.splitlines() if line[:1].isalpha()}


def scrape(port: int, process: subprocess.Popen, log: Path, path: str = "/metrics") -> str:
    """GET /metrics from a server starting on loopback (two minutes at most)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.read().decode()
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"no answer on port {port}: {log.read_text()[-3000:]}")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stopped_on_exit() -> Iterator[list[subprocess.Popen]]:
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_the_autoscaler_reads_a_metric_a_real_mrl_serve_exports(tiny_artifact, tmp_path, stopped_on_exit):
    container = server_container(render("cpu"))
    metric = one(render("cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in adapter_metrics()
    token = tmp_path / "token"
    token.write_text("a-token\n")
    metrics_port = free_port()
    # The Deployment's own settings, with only where things are changed for this machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRL_SERVE_")} | environment(container)
    env |= {
        "MRL_SERVE_ARTIFACTS": str(tiny_artifact),
        "MRL_SERVE_HOST": "127.0.0.1",
        "MRL_SERVE_PORT": "0",
        "MRL_SERVE_HTTP_PORT": "0",
        "MRL_SERVE_METRICS_PORT": str(metrics_port),
        "MRL_SERVE_AUTH_TOKEN_FILE": str(token),
    }
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mrl.serving.cli", *container.get("args", [])], env=env, stderr=out
        )
    stopped_on_exit.append(server)
    names = metric_names(scrape(metrics_port, server, log))
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert metric in names, f"{metric} is not among what mrl-serve exports: {sorted(names)}"


def test_the_triton_overlay_runs_on_a_real_tritonserver(tiny_artifact, tmp_path, stopped_on_exit):
    from triton_helpers import SERVER, require_triton

    require_triton()
    docs = render("triton")
    container = server_container(docs)
    metric = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in adapter_metrics()
    assert container["command"] == ["tritonserver"]
    repository = tmp_path / "repo"
    subprocess.run(
        [sys.executable, "-m", "mrl.export.cli", "triton", str(tiny_artifact), "--out", str(repository),
         "--encoder", "python", "--instances", "1", "--quiet"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    ports = {"grpc-port": free_port(), "http-port": free_port(), "metrics-port": free_port()}
    manifest_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {k: int(flags[f"{k}-port"]) for k in ("grpc", "http", "metrics")} == manifest_ports
    probes = [container[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert {p["port"] for p in probes} == {manifest_ports["http"]}
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + int(flags["exit-timeout-secs"])
    # The overlay's arguments, with only the repository and the ports moved for this machine.
    flags |= {k: str(v) for k, v in ports.items()} | {"model-repository": str(repository)}
    flags |= {"http-address": "127.0.0.1", "grpc-address": "127.0.0.1", "metrics-address": "127.0.0.1"}
    log = tmp_path / "triton.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(SERVER), *(f"--{k}={v}" for k, v in flags.items())], stdout=out, stderr=subprocess.STDOUT
        )
    stopped_on_exit.append(server)
    for probe in probes:
        deadline = time.monotonic() + 120
        while True:  # each probe's path answers 200 once the models are loaded
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['http-port']}{probe['path']}", timeout=5) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, OSError):
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
    names = metric_names(scrape(ports["metrics-port"], server, log))
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert metric in names, f"{metric} is not among what tritonserver exports: {sorted(names)}"
