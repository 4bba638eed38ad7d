"""Every instance file loads with Dagster's own config schemas, and they all carry the same limits.

dagster.yaml (local default), deploy/dagster.yaml (Postgres), deploy/docker/dagster.yaml (Docker run
launcher), deploy/k8s/values.yaml (Helm chart, K8s run launcher), deploy/workspace.yaml (gRPC location).
The Postgres instance is also opened against a real server (tests/support/postgres.py).
"""

import re
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import RunLauncher
from dagster._core.workspace.config_schema import ensure_workspace_config
from dagster._serdes import ConfigurableClassData
from support.dagster_procs import REPO, dagster_cli, dagster_env

LOCAL = REPO / "dagster.yaml"
DEPLOY = REPO / "deploy/dagster.yaml"
DOCKER = REPO / "deploy/docker/dagster.yaml"
HELM = REPO / "deploy/k8s/values.yaml"
WORKSPACE = REPO / "deploy/workspace.yaml"

PARTITION_LIMIT = {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
POOL = "packer_builds"
POOL_DEFAULT = 2
DEV_EXTRA = "the dev extra: pip install -e '.[dev]' (make test installs it)"
PG_ENV = {"DAGSTER_PG_HOST": "db.example.com", "DAGSTER_PG_PORT": "5433", "DAGSTER_PG_USER": "dagster",
          "DAGSTER_PG_PASSWORD": "not-a-secret", "DAGSTER_PG_DB": "dagster"}


def home_with(tmp_path: Path, source: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    shutil.copy(source, home / "dagster.yaml")
    return home


def processed(tmp_path: Path, source: Path) -> dict:
    """The file through Dagster's instance schema (env vars resolved), as `dagster` itself reads it."""
    config, _custom_class = dagster_instance_config(str(home_with(tmp_path, source)))
    return config


# ------------------------------------------------------------------ the local default


def test_local_instance_is_sqlite_under_dagster_home_with_queue_and_limits(tmp_path, monkeypatch):
    home = home_with(tmp_path, LOCAL)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        concurrency = instance.get_concurrency_config()
        assert concurrency.run_queue_config.tag_concurrency_limits == [PARTITION_LIMIT]
        assert concurrency.pool_config.default_pool_limit == POOL_DEFAULT
        assert concurrency.pool_config.pool_granularity.value == "op"
        assert instance.event_log_storage.get_concurrency_info(POOL).limit == POOL_DEFAULT
        instance.add_run(dg.DagsterRun(job_name="probe"))
    assert (home / "history" / "runs.db").exists()  # the run history lives under DAGSTER_HOME


def test_pool_limit_changes_with_the_documented_cli(tmp_path):
    home = home_with(tmp_path, LOCAL)
    env = dagster_env(home)
    dagster_cli(["instance", "concurrency", "set", POOL, "4"], env)
    shown = dagster_cli(["instance", "concurrency", "get", POOL], env).stdout
    assert re.search(r"\b4\b", shown), shown
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info(POOL)
        assert (info.limit, info.using_default_limit) == (4, False)


def test_the_pool_is_the_one_template_builds_use():
    from packer_assets import definitions

    assert definitions.defs.resolve_asset_graph().get(dg.AssetKey("template")).pools == {POOL}


def test_make_ui_starts_the_lab_and_dagster_dev_with_the_lab_env_and_instance(tmp_path):
    lab = tmp_path / "lab"
    home = tmp_path / "dh"
    plan = subprocess.run(["make", "-n", "ui", f"LAB_STATE={lab}", f"DAGSTER_HOME={home}", "UI_PORT=3999"],
                          cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert f"packer-assets lab up --state {lab}" in plan
    assert f'ln -sfn "{REPO}/dagster.yaml" "{home}/dagster.yaml"' in plan
    dev = [line for line in plan.splitlines() if " dev " in line]
    assert dev and dev[-1].startswith(f"PACKER_ASSETS_ENV_FILE={lab}/lab.env ")
    assert "dagster dev -m packer_assets.definitions -h 127.0.0.1 -p 3999" in dev[-1]


def test_makefile_links_the_repo_dagster_yaml_into_dagster_home(tmp_path):
    home = tmp_path / "dh"
    subprocess.run(["make", "-s", "dagster-home", f"DAGSTER_HOME={home}"], cwd=REPO, check=True)
    assert (home / "dagster.yaml").resolve() == LOCAL.resolve()
    own = tmp_path / "own"
    own.mkdir()
    (own / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = subprocess.run(["make", "-s", "dagster-home", f"DAGSTER_HOME={own}"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert "kept" in out and (own / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"


# ------------------------------------------------------------------ deploy/


def test_deploy_instance_is_postgres_from_the_environment(tmp_path, monkeypatch):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    config = processed(tmp_path, DEPLOY)
    utils = pytest.importorskip("dagster_postgres.utils", reason=f"needs dagster-postgres, {DEV_EXTRA}")
    pg_config, pg_url_from_config = utils.pg_config, utils.pg_url_from_config

    resolved = process_config(pg_config(), config["storage"]["postgres"])  # as dagster-postgres resolves it
    assert resolved.success, [e.message for e in resolved.errors]
    url = pg_url_from_config(resolved.value)
    assert url == "postgresql+psycopg2://dagster:not-a-secret@db.example.com:5433/dagster"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert "not-a-secret" not in DEPLOY.read_text()


def test_deploy_instance_opens_against_real_postgres(tmp_path, monkeypatch, postgres_server):
    pytest.importorskip("dagster_postgres", reason=f"needs dagster-postgres, {DEV_EXTRA}")
    pg = postgres_server.create_database("deploy_config")
    for name, value in pg.env().items():
        monkeypatch.setenv(name, value)
    with dg.DagsterInstance.from_config(str(home_with(tmp_path, DEPLOY))) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        assert instance.get_concurrency_config().run_queue_config.tag_concurrency_limits == [PARTITION_LIMIT]
        assert instance.event_log_storage.get_concurrency_info(POOL).limit == POOL_DEFAULT
        run = instance.add_run(dg.DagsterRun(job_name="probe", tags={"dagster/partition": "debian-12"}))
        assert instance.get_run_by_id(run.run_id).tags["dagster/partition"] == "debian-12"


def test_docker_instance_loads_the_docker_run_launcher(tmp_path, monkeypatch):
    pytest.importorskip("dagster_docker", reason=f"needs dagster-docker, {DEV_EXTRA}")
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    launcher = processed(tmp_path, DOCKER)["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    # the launcher's own schema and constructor (no Docker daemon needed until a run is launched)
    built = ConfigurableClassData(launcher["module"], launcher["class"],
                                  yaml.safe_dump(launcher["config"])).rehydrate(as_type=RunLauncher)
    assert built.container_kwargs["network_mode"] == "host"
    assert "DAGSTER_PG_PASSWORD" in built.env_vars  # by name: the value comes from the daemon's env


def test_docker_compose_runs_webserver_daemon_and_code_location():
    compose = yaml.safe_load((REPO / "deploy/docker/docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "code-location", "webserver", "daemon"} <= set(services)
    assert services["code-location"]["command"][:5] == ["dagster", "code-server", "start", "-m",
                                                        "packer_assets.definitions"]
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    for name in ("webserver", "daemon", "code-location"):
        mounts = services[name]["volumes"]
        assert "./dagster.yaml:/opt/dagster/home/dagster.yaml:ro" in mounts, name
        assert "../workspace.yaml:/opt/dagster/home/workspace.yaml:ro" in mounts, name
    env = services["code-location"]["environment"]
    assert env["DAGSTER_CODE_PORT"] == "4000" and "-p" in services["code-location"]["command"]
    assert (REPO / "deploy/docker/Dockerfile").exists()


def helm_run_launcher_config(values: dict) -> dict:
    """What the chart renders into dagster.yaml's run_launcher config for K8sRunLauncher."""
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s = k8s.get("runK8sConfig", {})
    return {
        # filled in by the chart itself
        "instance_config_map": "dagster-instance",
        "service_account_name": "dagster",
        "dagster_home": "/opt/dagster/dagster_home",
        "postgres_password_secret": "dagster-postgresql-secret",
        # from our values
        "load_incluster_config": k8s["loadInclusterConfig"],
        "env_secrets": [s["name"] for s in k8s.get("envSecrets", [])],
        "run_k8s_config": {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key): value
                           for key, value in run_k8s.items()},
    }


def helm_concurrency(values: dict) -> dict:
    """values.concurrency as the chart renders it into dagster.yaml's `concurrency:`."""
    block = values["concurrency"]
    assert block["enabled"] is True
    pools, runs = block["pools"], block["runs"]
    return {"pools": {"default_limit": pools["defaultLimit"], "granularity": pools["granularity"]},
            "runs": {"max_concurrent_runs": runs["maxConcurrentRuns"],
                     "tag_concurrency_limits": runs["tagConcurrencyLimits"]}}


def test_helm_values_use_the_k8s_run_launcher_and_load_with_its_schema():
    K8sRunLauncher = pytest.importorskip("dagster_k8s.launcher", reason=f"needs dagster-k8s, {DEV_EXTRA}").K8sRunLauncher

    values = yaml.safe_load(HELM.read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    result = process_config(K8sRunLauncher.config_type(), helm_run_launcher_config(values))
    assert result.success, [e.message for e in result.errors]
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "packer_assets.definitions"]
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"


def test_every_instance_file_has_the_same_limits(tmp_path, monkeypatch):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    blocks = {path.name if path != DOCKER else "docker/dagster.yaml": yaml.safe_load(path.read_text())["concurrency"]
              for path in (LOCAL, DEPLOY, DOCKER)}
    blocks["k8s/values.yaml"] = helm_concurrency(yaml.safe_load(HELM.read_text()))
    reference = blocks.pop("dagster.yaml")
    assert reference["runs"]["tag_concurrency_limits"] == [PARTITION_LIMIT]
    assert reference["pools"]["default_limit"] == POOL_DEFAULT
    for name, block in blocks.items():
        assert block == reference, name
    # and the rendered Helm block passes the instance schema like the files do
    rendered = home_with(tmp_path, LOCAL)
    (rendered / "dagster.yaml").write_text(yaml.safe_dump({"concurrency": helm_concurrency(
        yaml.safe_load(HELM.read_text()))}))
    assert dagster_instance_config(str(rendered))[0]["concurrency"]["pools"]["default_limit"] == POOL_DEFAULT


def test_every_instance_enables_run_monitoring_and_frees_the_slots_of_ended_runs(tmp_path, monkeypatch):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    for path in (LOCAL, DEPLOY, DOCKER):
        monitoring = processed(tmp_path, path)["run_monitoring"]
        assert monitoring["enabled"] is True and monitoring["free_slots_after_run_end_seconds"] > 0, path
    helm = yaml.safe_load(HELM.read_text())["dagsterDaemon"]["runMonitoring"]
    assert helm["enabled"] is True and helm["freeSlotsAfterRunEndSeconds"] > 0


def test_workspace_names_a_grpc_code_location_from_the_environment(monkeypatch):
    monkeypatch.setenv("DAGSTER_CODE_HOST", "code-location")
    monkeypatch.setenv("DAGSTER_CODE_PORT", "4000")
    config = ensure_workspace_config(yaml.safe_load(WORKSPACE.read_text()), str(WORKSPACE))
    (entry,) = config["load_from"]
    assert entry["grpc_server"]["location_name"] == "packer_assets"
    assert (entry["grpc_server"]["host"], entry["grpc_server"]["port"]) == ("code-location", 4000)


@pytest.mark.parametrize("path", ["deploy/README.md"])
def test_deploy_readme_names_every_file(path):
    text = (REPO / path).read_text()
    for name in ("dagster.yaml", "workspace.yaml", "docker/docker-compose.yaml", "docker/Dockerfile",
                 "k8s/values.yaml", "dagster code-server start -m packer_assets.definitions",
                 "dagster instance concurrency set packer_builds"):
        assert name in text, name
