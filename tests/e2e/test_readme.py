"""Every command in the README runs as written: those that can run in the lab are run here, in order,
in an export of the repository (so the developer's own `.lab`, outputs and Dagster home are left alone),
starting with `make demo`. Every other command the README shows is listed with the reason it is not
run here; a README command in neither list fails the test, so a new one cannot slip in unchecked."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from support import REPO
from support.checkout import export_repository

from packer_assets.inspection.sbom import package_count, validate_sbom

pytestmark = [pytest.mark.lab, pytest.mark.packer, pytest.mark.e2e]
KEYS = ("ubuntu-2204", "ubuntu-2404", "debian-12", "rocky-9", "windows-2022", "debian-13", "ubuntu-2604", "rocky-10",
        "windows-2025")

BUILD_UBUNTU = ("dagster job execute -j rebuild_template --tags '{\"dagster/partition\": \"ubuntu-2204\"}' "
                "-m packer_assets.definitions")
FORCE_DEBIAN = ("dagster job execute -j rebuild_template_forced --tags '{\"dagster/partition\": \"debian-12\"}' "
                "-m packer_assets.definitions")

# Run in this order in the export, each must exit 0. (command, stdin)
RUN = [
    ("make demo", None),
    ("packer-assets lab up", None),  # a no-op on the lab make demo started
    ("packer-assets lab status", None),
    ("export PACKER_ASSETS_ENV_FILE=$PWD/.lab/lab.env", None),
    ("packer-assets settings", None),
    ("packer-assets catalog check", None),
    ("make catalog-check", None),
    ("make real-keys", None),  # the keys make demo-real would build (prints them, runs nothing)
    ("make lab-status", None),
    ("make lab-up", None),  # a no-op on the running lab
    ("source infra/env/.env.proxmox", None),
    ("dagster job execute -j check_proxmox_env -m packer_assets.definitions", None),
    ("make init", None),
    ("dagster asset materialize --select proxmox_env -m packer_assets.definitions --config-json "
     "'{\"ops\": {\"proxmox_env\": {\"config\": {\"rotate\": true}}}}'", None),
    ("packer-assets validate", None),
    ("make validate", None),
    ("make build KEY=debian-12", None),
    # debian-12's template from make demo is 9300 (the first VMID of its range); the revocation makes
    # make build-all below build a new one
    ("packer-assets channel set production debian-12 9300", None),
    ("packer-assets channel list", None),
    ("packer-assets channel unset production debian-12", None),
    ('packer-assets revoke 9300 --reason "CVE-2026-1234 in openssl"', None),
    ("packer-assets lab publish ubuntu-2204", None),
    (BUILD_UBUNTU, None),
    ("make build KEY=ubuntu-2204", None),
    ("dagster sensor start iso_checksum_sensor -m packer_assets.definitions", None),
    ("dagster schedule start weekly_rebuild -m packer_assets.definitions", None),
    ("dagster job backfill -j rebuild_template --partitions ubuntu-2204,debian-12 -m packer_assets.definitions", "y\n"),
    ("dagster instance concurrency set packer_builds 4", None),
    ("python -m packer_assets.evidence.proof", None),
    ("packer-assets proof verify --allowed-signers .lab/signing/allowed_signers", None),
    ("packer-assets chain --key debian-12", None),
    ("make build-all", None),
    ("packer-assets plan", None),
    (FORCE_DEBIAN, None),
    ("packer-assets lab down", None),
    ("make lab-down", None),  # nothing left to stop: still exit 0
    ("make clean", None),
]

NOT_RUN = {
    "make test": "the suite itself (make test-fast, make test-lab and PYTEST_ARGS: parts of it)",
    "make lint": "the gates: make test (.ci/run) runs it first",
    "make ui": "a long-running webserver: tests/e2e/test_ui_browser.py drives `dagster dev` in Chromium",
    "dagster dev": "a long-running webserver: tests/e2e/test_ui_browser.py runs it",
    "make bench": "prints figures for minutes; bench/ is not a test",
    "make build-all ALL=1": "a run per key, each skipping an up-to-date key: make build-all (the pre-checked one) is run",
    "packer-assets chain CHAIN-<ts>-<key> [--json]": "a synopsis: the chain IDs differ per run; "
                                                      "tests/defs/test_defs_chain.py runs it on a build and a failed one",
    "packer-assets proof verify PATH|CHAIN-ID [--allowed-signers FILE] [--require-signature]":
        "a synopsis: packer-assets proof verify --allowed-signers .lab/signing/allowed_signers is run",
    "make build KEY=<key>": "a placeholder: make build KEY=debian-12 is run",
    "packer-assets build ": "what make build KEY=debian-12 runs (it is run); tests/core/test_cli.py runs its errors",
    "make build KEY=\"deb'ian\"": "an error case: tests/core/test_cli.py runs it (one line, nothing run)",
    "packer-assets chain ../../etc": "an error case: tests/core/test_cli.py runs it (one line, exit 2)",
    "dagster job execute -j ...": "a synopsis: the job execute commands above are run",
    "dagster asset materialize --select ...": "a synopsis: tests/defs/test_recovery.py runs such selections",
    "dagster job launch -j": "needs a daemon: tests/e2e/test_daemon_notifications.py launches runs; "
                             "tests/defs/test_defs_template.py runs rebuild_template_forced as job launch creates it",
    "make demo-real": "CI runs it on a clean clone after make test (.ci/run); the same real-guest builds run in "
                      "tests/lab/realguest/test_realguest_builds.py",
    "packer-assets lab up --real-guest": "make demo-real runs it (.ci/run); tests start the same lab in-process",
    "packer-assets validate [KEY...] [--allow-degraded]": "a synopsis: packer-assets validate is run",
    "dagster code-server start": "a long-running service: tests/e2e/test_deploy_postgres.py runs it",
    "dagster-webserver -w deploy/workspace.yaml": "a long-running service; deploy/ is loaded by tests/e2e/test_deploy_config.py",
    "dagster-daemon run -w deploy/workspace.yaml": "a long-running service: tests/e2e/test_deploy_postgres.py runs it",
}
COMMAND = re.compile(r"(dagster|dagster-webserver|dagster-daemon|packer-assets|make|python -m|source|export) ")


def readme_commands(text: str) -> list[str]:
    """The commands of the README: each line of a ```console block, and each inline `command ...`."""
    found = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        found += [line for raw in block.splitlines() if (line := re.sub(r"\s+#.*$", "", raw).strip())]
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        span = " ".join(span.split())
        if COMMAND.match(span):
            found.append(span)
    return list(dict.fromkeys(found))


def test_every_readme_command_is_run_or_says_why_not():
    ran = {command for command, _stdin in RUN}
    unaccounted = [c for c in readme_commands((REPO / "README.md").read_text())
                   if c not in ran and not any(c.startswith(prefix) for prefix in NOT_RUN)]
    assert unaccounted == [], f"README commands neither run by this test nor listed in NOT_RUN (tests/e2e/test_readme.py): {unaccounted}"


# All of RUN together (a run took 154 s on 2 cores); one command alone at most COMMAND_TIMEOUT.
RUN_BUDGET = 1500
COMMAND_TIMEOUT = 900


@pytest.mark.timeout(RUN_BUDGET + 300)  # and the lab's stop (120 s), make demo's signature checks (60 s)
def test_readme_commands_run_as_written_in_the_lab(tmp_path):
    stamp = REPO / ".venv/.installed"
    if not stamp.exists():
        pytest.skip("needs the .venv that `make test` creates (the make targets use it)")
    clone = export_repository(tmp_path / "clone")
    # The venv `make test` made, taken as up to date: its pyproject.toml is this one.
    os.symlink(REPO / ".venv", clone / ".venv")
    os.utime(clone / "pyproject.toml", (stamp.stat().st_mtime - 1,) * 2)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PACKER_ASSETS_", "PROXMOX_", "PACKER_INSTALL", "DAGSTER_", "PYTEST_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
               DAGSTER_HOME=str(clone / ".dagster_home"), CHECKPOINT_DISABLE="1")
    log = []
    deadline = time.monotonic() + RUN_BUDGET
    try:
        for command, stdin in RUN:
            if command.startswith("export "):
                name, value = command.removeprefix("export ").split("=", 1)
                env[name] = value.replace("$PWD", str(clone))
                continue
            registry = clone / "docs/proof/platform/packer-builds/registry.json"
            before = registry.read_bytes() if registry.exists() else None
            left = min(COMMAND_TIMEOUT, deadline - time.monotonic())
            assert left > 0, f"the README's commands took over {RUN_BUDGET} s; not run: {command}\n" + "\n".join(log[-3:])
            try:
                proc = subprocess.run(["bash", "-c", f"set -e; {command}"], cwd=clone, env=env, input=stdin or "",
                                      capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired as slow:
                said = "".join(out.decode(errors="replace") if isinstance(out, bytes) else out
                               for out in (slow.stdout, slow.stderr) if out)[-3000:]
                pytest.fail(f"README command still running after {left:.0f} s: {command}\n{said}")
            log.append(f"$ {command}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            assert proc.returncode == 0, f"README command failed (exit {proc.returncode}):\n" + log[-1]
            if command == "make build KEY=debian-12":  # a no-op after make demo: the registry stays byte for byte
                assert before is not None and registry.read_bytes() == before
            check_after(command, clone, proc)
    finally:
        subprocess.run([str(Path(sys.executable).parent / "packer-assets"), "lab", "down"], cwd=clone, env=env,
                       capture_output=True, timeout=120)


def check_after(command: str, clone: Path, proc: subprocess.CompletedProcess) -> None:
    """What a command must have left behind, beyond its exit status."""
    proofs = clone / "docs/proof/platform/packer-builds/builds"
    if command == "make demo":
        schema = json.loads((REPO / "docs/schema/build-proof.schema.json").read_text())
        for key in KEYS:
            assert (proofs / key / "latest/proof.json").is_file(), f"make demo left no proof for {key}"
            # each proof names the OS it found and the one it expected, and carries a valid SBOM counted in its README
            proof = json.loads((proofs / key / "latest/proof.json").read_text())
            jsonschema.validate(proof, schema)
            smoke = proof["checks"][0]["details"]
            assert smoke["found_os"] and smoke["found_os"].split()[0] == smoke["expected_os"].split()[0], smoke
            bom = json.loads((proofs / key / "latest/sbom.cdx.json").read_text())
            validate_sbom(bom)
            assert proof["sbom"]["packages"] == package_count(bom) > 0
            readme = (proofs / key / "latest/README.md").read_text()
            assert f"| Packages (SBOM) | `{package_count(bom)} in sbom.cdx.json, read from: lab: simulated guest" in readme
        # the lab signs every bundle: stock ssh-keygen accepts each manifest's signature
        allowed = clone / ".lab/signing/allowed_signers"
        for folder in [*(proofs / key / "latest" for key in KEYS), clone / "docs/proof/platform/packer-builds/init/latest"]:
            done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "lab-signer@packer-assets",
                                   "-n", "packer-assets-proof", "-s", str(folder / "manifest.json.sig")],
                                  stdin=(folder / "manifest.json").open("rb"), capture_output=True, timeout=60)
            assert done.returncode == 0, (folder, done.stderr)
        init = json.loads((clone / "docs/proof/platform/packer-builds/init/latest/proof.json").read_text())
        jsonschema.validate(init, json.loads((REPO / "docs/schema/init-proof.schema.json").read_text()))
        assert (clone / "infra/env/.env.proxmox").is_file()
        # every build was a run of the job rebuild_template (in its history in the UI), and says it built
        builds = [(run.job_name, run.tags.get(OUTCOME)) for run, _count in key_runs(clone)]
        assert builds == [("rebuild_template", "built")] * len(KEYS), builds
    elif command in KEY_RUNS:  # the newest run of a key: its job, its outcome, its key's template materializations
        (run, count), *_ = key_runs(clone)
        assert (run.job_name, run.tags.get(OUTCOME), count) == KEY_RUNS[command], run.tags
    elif command == "packer-assets validate":
        assert all(f"ok   {key}:" in proc.stdout for key in KEYS), proc.stdout
    elif command.startswith("dagster job execute -j check_proxmox_env"):
        text = proc.stdout + proc.stderr
        assert "token_authenticates" in text and "token_privileges" in text, text[-2000:]
        assert "ASSET_CHECK_EVALUATION" in text and "RUN_SUCCESS" in text, text[-2000:]
    elif command == "python -m packer_assets.evidence.proof":  # regenerated in the export: the committed schemas are current
        for name in ("docs/schema/build-proof.schema.json", "docs/schema/init-proof.schema.json"):
            assert (clone / name).read_text() == (REPO / name).read_text()
    elif command.startswith("packer-assets proof verify"):
        assert proc.stdout.count("signed by lab-signer@packer-assets") >= len(KEYS) + 1, proc.stdout
        assert "FAILED" not in proc.stdout
    elif command == "packer-assets chain --key debian-12":
        assert re.search(r"^CHAIN-\d{8}T\d{6}Z-debian-12  proved$", proc.stdout, re.M), proc.stdout
    elif command.startswith(("packer-assets channel set", "packer-assets revoke")):
        registry = json.loads((clone / "docs/proof/platform/packer-builds/registry.json").read_text())
        jsonschema.validate(registry, json.loads((REPO / "docs/schema/registry.schema.json").read_text()))
        debian = registry["templates"]["debian-12"]
        if command.startswith("packer-assets channel set"):
            assert debian["channels"]["production"] == 9300, debian["channels"]
            assert all(registry["templates"][key]["current"] for key in KEYS)
        else:  # not current, no channel points at it; retained as revoked, with its reason
            assert 9300 not in debian["channels"].values() and (debian["current"] or {}).get("vmid") != 9300
            assert [(v["revoked"], v["revoked_reason"]) for v in debian["retained"] if v["vmid"] == 9300] == [
                (True, "CVE-2026-1234 in openssl")]
    elif command == "packer-assets plan":  # right after make build-all: nothing left to run
        assert proc.stdout.strip().endswith(f"0 of {len(KEYS)} key(s) to run, {len(KEYS)} unchanged"), proc.stdout
    elif command == "make clean":
        assert not (clone / ".lab").exists() and not (clone / "output").exists()


OUTCOME = "packer-assets/outcome"
# command -> (job, outcome, materializations of the key's template so far). After make demo, make build of a key
# is a no-op (exit 0, no new materialization); a new release, a revocation or force builds.
KEY_RUNS = {
    "make build KEY=debian-12": ("rebuild_template", "up-to-date", 1),
    BUILD_UBUNTU: ("rebuild_template", "built", 2),  # after `lab publish ubuntu-2204`
    "make build KEY=ubuntu-2204": ("rebuild_template", "up-to-date", 2),
    FORCE_DEBIAN: ("rebuild_template_forced", "built", 3),  # make demo's, make build-all's after the revocation
}


def key_runs(clone: Path) -> list:
    """(run, the number of template materializations of its key) for each run of one key in the export's
    instance, newest first."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(clone / ".dagster_home")) as instance:
        runs = [r for r in instance.get_runs() if "dagster/partition" in r.tags]
        return [(r, len(instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("template"), asset_partitions=[r.tags["dagster/partition"]]),
            limit=100).records)) for r in runs]


def test_readme_shell_lines_parse():
    """Every listed command is valid shell as written (quotes balance)."""
    for command, _stdin in RUN:
        shlex.split(command)
