"""The registry, channels and revocation against the lab, as the build token: what registry.json says after
each change, the tags and description on the node, the refusals (one line, nothing changed), and the CLI."""

import json
import os
import shutil
import threading
import time
from datetime import UTC, date, datetime

import jsonschema
import pytest
from support import REPO
from support.templates import NODE, create_vm, day, description, make_template, race_after

from packer_assets import cli
from packer_assets.catalog import load_catalog
from packer_assets.evidence.channels import ChannelError, revoke, set_channel, unset_channel
from packer_assets.errors import PackerAssetsError
from packer_assets.evidence.layout import BUILD_RECORD_NAME, Layout
from packer_assets.runs.locks import exclusive
from packer_assets.pve.templates import (
    LATEST_TAG,
    REVOKED_TAG,
    TemplateError,
    is_up_to_date,
    promote,
    promoted_template,
    prune,
    read_description,
    read_revocation,
    split_tags,
    template_name,
)
from packer_assets.evidence.registry import (
    build_registry,
    read_registry,
    registry_schema,
    registry_table,
    write_registry,
)

KEY = "debian-12"  # the shipped catalog's key, VMIDs 9300-9399
FINGERPRINT = "f" * 64


@pytest.fixture
def catalog():
    return load_catalog(REPO / "templates/catalog.yaml", env={}, project_dir=REPO)


@pytest.fixture
def layout(access, tmp_path):
    return Layout(tmp_path / "project")  # where the access fixture's init wrote .env.proxmox


def built(api, layout, vmid, when, *, promoted=False, record=True, warnings=(), key=KEY):
    """A template as a passed build leaves it: named and tagged, its description with the chain ID, and
    (record=True) its build record in the output root."""
    vm = make_template(api, key, vmid, when, promoted=promoted)
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    text = description(key, FINGERPRINT).model_copy(update={"chain_id": f"CHAIN-{stamp}-{key}", "built_at": when})
    vm.config.put(description=text.render())
    if record:
        folder = layout.build_log_dir(key, stamp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / BUILD_RECORD_NAME).write_text(json.dumps({
            "template": {"vmid": vmid}, "packer_version": "1.6.6", "warnings": list(warnings),
            "smoke": {"found_os": "debian 12", "expected_os": "debian 12", "packages": 300 + vmid % 100}}))
    return f"CHAIN-{stamp}-{key}"


def tags(api, vmid):
    return set(split_tags(api.nodes(NODE).qemu(vmid).config.get().get("tags")))


def node_state(api):
    return {g["vmid"]: (g.get("tags"), api.nodes(NODE).qemu(g["vmid"]).config.get().get("description"))
            for g in api.cluster.resources.get(type="vm")}


def test_the_registry_lists_every_key_with_its_current_template(api, access, layout, catalog):
    built(api, layout, 9300, day(1))
    built(api, layout, 9301, day(2), promoted=True,
          warnings=["degraded build: no EFI disk: packer 1.6.6", "tags: packer 1.6.6 cannot set tags (a note)"])
    built(api, layout, 9302, day(3), record=False)  # newer, under test by another run: not listed yet
    built(api, layout, 9310, day(4), record=False, promoted=True)  # promoted, built from another output root
    api.nodes(NODE).qemu(9310).config.put(tags="packer-assets;debian-12")  # ... and then demoted: not listed
    registry = write_registry(layout, api, catalog)
    document = json.loads(layout.registry_file.read_text())
    jsonschema.validate(document, registry_schema())
    assert list(document["templates"]) == catalog.keys()  # every key, in catalog order
    debian = registry.templates[KEY]
    assert debian.current.vmid == 9301 and debian.current.name == template_name(KEY, day(2))
    assert debian.current.chain_id == "CHAIN-20261102T120000Z-debian-12" and debian.current.node == NODE
    assert debian.current.iso.url.endswith(".iso") and debian.current.iso.checksum == "sha256:" + "ab" * 32
    assert debian.current.degraded is True and debian.current.degraded_reasons == ["no EFI disk: packer 1.6.6"]
    assert debian.current.smoke.found_os == "debian 12" and debian.current.smoke.packages == 301
    assert debian.current.packer_version == "1.6.6" and debian.current.proof is None
    assert [v.vmid for v in debian.retained] == [9300] and debian.retained[0].degraded is False
    assert debian.channels == {"latest": 9301}
    assert all(registry.templates[k].current is None and registry.templates[k].channels == {}
               for k in catalog.keys() if k != KEY)
    assert access.token_secret not in layout.registry_file.read_text()


def test_the_registry_names_each_key_s_end_of_life_and_whether_it_is_past(api, layout, catalog, monkeypatch):
    """registry.json carries the catalog's eol per key, and past_eol as of when it was written (the eol clock;
    a test's `now`): debian-12's LTS ends 2028-06-30, so a registry of 2028-07-01 marks it past, its table too."""
    built(api, layout, 9301, day(2), promoted=True)
    monkeypatch.setattr("packer_assets.catalog.eol.today", lambda: date(2028, 6, 30))  # the last supported day
    debian = write_registry(layout, api, catalog).templates[KEY]
    assert debian.eol == date(2028, 6, 30) and debian.past_eol is False
    assert json.loads(layout.registry_file.read_text())["templates"][KEY]["eol"] == "2028-06-30"
    monkeypatch.setattr("packer_assets.catalog.eol.today", lambda: date(2028, 7, 1))
    later = write_registry(layout, api, catalog)  # past_eol changed: the file is rewritten
    assert later.templates[KEY].past_eol is True and read_registry(layout).templates[KEY].past_eol is True
    assert later.templates["rocky-9"].past_eol is False  # its end of life is 2032-05-31
    row = next(line for line in registry_table(later).splitlines() if line.startswith(f"| {KEY} | 9301 |"))
    assert "| 2028-06-30 (PAST) |" in row
    stamped = build_registry(layout, api, catalog, now=datetime(2027, 1, 1, tzinfo=UTC))
    assert stamped.templates[KEY].past_eol is False  # a given `now` decides, not the clock


def test_an_unchanged_registry_is_kept_byte_for_byte(api, layout, catalog):
    built(api, layout, 9300, day(1), promoted=True)
    write_registry(layout, api, catalog)
    before = layout.registry_file.read_bytes()
    again = write_registry(layout, api, catalog)
    assert layout.registry_file.read_bytes() == before
    assert again == read_registry(layout)
    built(api, layout, 9301, day(2))
    promote(api, NODE, KEY, 9301)
    write_registry(layout, api, catalog)
    assert read_registry(layout).templates[KEY].current.vmid == 9301  # a change is written


def test_channel_set_moves_the_tag_and_unset_takes_it(api, layout, catalog):
    built(api, layout, 9300, day(1))
    chain = built(api, layout, 9301, day(2), promoted=True)
    change = set_channel(layout, api, catalog, "production", KEY, "9300")
    assert change.vmid == 9300 and change.taken_from == ()
    assert "packer-assets-channel-production" in tags(api, 9300)
    assert read_registry(layout).templates[KEY].channels == {"latest": 9301, "production": 9300}
    assert read_registry(layout).templates[KEY].retained[0].channels == ["production"]
    # by chain ID: the channel moves, the old template loses the tag
    change = set_channel(layout, api, catalog, "production", KEY, chain)
    assert change.vmid == 9301 and change.taken_from == (9300,)
    assert "packer-assets-channel-production" not in tags(api, 9300)
    assert read_registry(layout).templates[KEY].current.channels == ["production"]
    assert unset_channel(layout, api, catalog, "production", KEY).taken_from == (9301,)
    assert read_registry(layout).templates[KEY].channels == {"latest": 9301}
    assert unset_channel(layout, api, catalog, "production", KEY).taken_from == ()  # nothing to take: no error


@pytest.mark.parametrize("args, said", [
    (("Prod", KEY, "9300"), "bad channel name 'Prod'"),
    (("latest", KEY, "9300"), "channel latest is the promoted template"),
    (("production", "debian-14", "9300"), "debian-14: unknown template key"),
    (("production", KEY, "9200"), "9200: no template of key debian-12"),  # ubuntu-2404's template
    (("production", KEY, "9399"), "9399: no template of key debian-12"),  # no VM at all
    (("production", KEY, "CHAIN-20261101T120000Z-ubuntu-2404"), "is of key ubuntu-2404, not debian-12"),
    (("production", KEY, "CHAIN-20261109T120000Z-debian-12"), "no template of key debian-12"),
    (("production", KEY, "newest"), "'newest' is neither a VMID nor a chain ID"),
    (("production", KEY, "93\u00b2"), "'93\u00b2' is neither a VMID nor a chain ID"),  # isdigit() takes '²'
    (("production", KEY, "9302"), "template 9302 (debian-12-20261103120000) is revoked"),
])
def test_a_bad_channel_request_is_one_line_and_changes_nothing(api, layout, catalog, args, said):
    built(api, layout, 9300, day(1), promoted=True)
    built(api, layout, 9200, day(1), key="ubuntu-2404")
    built(api, layout, 9302, day(3))
    revoke(layout, api, catalog, "9302")
    state, file = node_state(api), layout.registry_file.read_bytes()
    with pytest.raises(PackerAssetsError, match=said.replace("(", r"\(").replace(")", r"\)")) as caught:
        set_channel(layout, api, catalog, *args)
    assert "\n" not in str(caught.value)
    assert node_state(api) == state and layout.registry_file.read_bytes() == file


def test_revoke_takes_promotion_and_channels_and_the_key_is_no_longer_up_to_date(api, layout, catalog):
    built(api, layout, 9300, day(1))
    chain = built(api, layout, 9301, day(2), promoted=True)
    set_channel(layout, api, catalog, "production", KEY, "9301")
    assert is_up_to_date(api, KEY, FINGERPRINT) == (True, 9301)
    when = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    done = revoke(layout, api, catalog, chain, "CVE-2026-0001 in openssl", now=when)
    assert (done.vmid, done.was_promoted, done.channels) == (9301, True, ("production",))
    assert tags(api, 9301) == {"packer-assets", KEY, REVOKED_TAG}
    text = api.nodes(NODE).qemu(9301).config.get()["description"]
    assert "**Revoked** 2026-11-29 08:00:00 UTC: CVE-2026-0001 in openssl" in text
    assert read_revocation(text).reason == "CVE-2026-0001 in openssl"
    assert read_description(text).chain_id == chain  # the build record still reads, still the last line
    # consumers: no current template, no channel points at it; the next build does not skip
    assert is_up_to_date(api, KEY, FINGERPRINT) == (False, None) and promoted_template(api, KEY) is None
    debian = read_registry(layout).templates[KEY]
    assert debian.current is None and debian.channels == {}
    revoked = next(v for v in debian.retained if v.vmid == 9301)
    assert revoked.revoked and revoked.revoked_at == when and revoked.revoked_reason == "CVE-2026-0001 in openssl"
    # a revoked template is never promoted again, nor revoked twice
    with pytest.raises(TemplateError, match="refusing to promote VM 9301: it is revoked"):
        promote(api, NODE, KEY, 9301)
    with pytest.raises(ChannelError, match=r"template 9301 \(debian-12-20261102120000\) is already revoked "
                                           r"\(2026-11-29 08:00:00 UTC\)"):
        revoke(layout, api, catalog, "9301")
    # even with the promotion tag put back by hand, it is not the promoted template
    api.nodes(NODE).qemu(9301).config.put(tags=f"packer-assets;{KEY};{LATEST_TAG};{REVOKED_TAG}")
    assert promoted_template(api, KEY) is None and build_registry(layout, api, catalog).templates[KEY].current is None


@pytest.mark.parametrize("ref, reason, said", [
    ("9301", "two\nlines", "--reason must be one line"),
    ("9301", "x" * 201, "--reason must be one line of 1-200"),
    ("9301", "  ", "--reason must be one line"),
    ("9999", None, "9999: no template of any catalog key"),
    ("9300", None, "9300: no template of any catalog key"),  # a VM, not a template
])
def test_a_bad_revocation_is_one_line_and_changes_nothing(api, layout, catalog, ref, reason, said):
    create_vm(api, 9300, name=template_name(KEY, day(1)), tags=f"packer-assets;{KEY}")
    built(api, layout, 9301, day(2), promoted=True)
    state = node_state(api)
    with pytest.raises(PackerAssetsError, match=said):
        revoke(layout, api, catalog, ref, reason)
    assert node_state(api) == state and not layout.registry_file.exists()


def test_prune_keeps_a_template_a_channel_points_at(api, layout, catalog):
    for n, vmid in enumerate((9300, 9301, 9302, 9303), start=1):
        built(api, layout, vmid, day(n), promoted=vmid == 9303)
    set_channel(layout, api, catalog, "production", KEY, "9300")
    result = prune(api, NODE, KEY, retention=1)
    assert sorted(result.destroyed) == [9301, 9302]
    assert {g["vmid"] for g in api.cluster.resources.get(type="vm")} == {9300, 9303}
    write_registry(layout, api, catalog)
    assert read_registry(layout).templates[KEY].channels == {"latest": 9303, "production": 9300}


# ----------------------------------------------------------------------------- races and an unwritable registry


def test_a_channel_set_racing_a_promotion_leaves_one_latest_and_the_channel(api, layout, catalog, monkeypatch):
    """The reported break: `channel set` read 9300's tags (latest among them), a promotion moved latest to
    9301, and the channel write put latest back on 9300. Now the write is refused and recomputed."""
    built(api, layout, 9300, day(1), promoted=True)
    built(api, layout, 9301, day(2))
    raced = race_after(monkeypatch, 9300, lambda: promote(api, NODE, KEY, 9301))
    change = set_channel(layout, api, catalog, "production", KEY, "9300")
    assert raced and change.vmid == 9300
    assert tags(api, 9300) == {"packer-assets", KEY, "packer-assets-channel-production"}
    assert LATEST_TAG in tags(api, 9301)
    assert read_registry(layout).templates[KEY].channels == {"latest": 9301, "production": 9300}


def test_a_channel_unset_racing_a_channel_set_takes_only_what_it_read(api, layout, catalog, monkeypatch):
    built(api, layout, 9300, day(1), promoted=True)
    built(api, layout, 9301, day(2))
    set_channel(layout, api, catalog, "production", KEY, "9300")
    raced = race_after(monkeypatch, 9300, lambda: set_channel(layout, api, catalog, "staging", KEY, "9300"))
    assert unset_channel(layout, api, catalog, "production", KEY).taken_from == (9300,)
    assert raced and tags(api, 9300) == {"packer-assets", KEY, LATEST_TAG, "packer-assets-channel-staging"}


def test_two_revocations_racing_revoke_once(api, layout, catalog, monkeypatch):
    built(api, layout, 9301, day(2), promoted=True)
    first = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    race_after(monkeypatch, 9301, lambda: revoke(layout, api, catalog, "9301", "first", now=first))
    with pytest.raises(ChannelError, match=r"already revoked \(2026-11-29 08:00:00 UTC\)"):
        revoke(layout, api, catalog, "9301", "second")
    text = api.nodes(NODE).qemu(9301).config.get()["description"]
    assert read_revocation(text).reason == "first" and "second" not in text
    assert tags(api, 9301) == {"packer-assets", KEY, REVOKED_TAG}


def unwritable_registry(layout, how):
    """registry.json replaced by a directory, or its folder a file."""
    if how == "directory":
        (layout.registry_file / "x").mkdir(parents=True)
    else:
        layout.registry_file.parent.parent.mkdir(parents=True, exist_ok=True)
        layout.registry_file.parent.write_text("a file where the registry's folder belongs\n")


@pytest.mark.parametrize("how, said", [("directory", "is a directory"), ("folder", "cannot be written")])
@pytest.mark.parametrize("change", [
    lambda layout, api, catalog: set_channel(layout, api, catalog, "production", KEY, "9300"),
    lambda layout, api, catalog: unset_channel(layout, api, catalog, "production", KEY),
    lambda layout, api, catalog: revoke(layout, api, catalog, "9301"),
], ids=["set", "unset", "revoke"])
def test_a_registry_that_cannot_be_written_fails_before_the_node_changes(api, layout, catalog, how, said, change):
    built(api, layout, 9300, day(1))
    built(api, layout, 9301, day(2), promoted=True)
    set_channel(layout, api, catalog, "production", KEY, "9301")
    shutil.rmtree(layout.registry_file.parent)
    unwritable_registry(layout, how)
    state = node_state(api)
    with pytest.raises(PackerAssetsError, match=said) as caught:
        change(layout, api, catalog)
    assert str(caught.value).startswith(str(layout.registry_file)) and "\n" not in str(caught.value)
    assert node_state(api) == state


# ----------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as ended:
        cli.main(list(argv))
    out = capsys.readouterr()
    return ended.value.code, out.out, out.err


@pytest.fixture
def cli_project(layout, monkeypatch):
    monkeypatch.setenv("PACKER_ASSETS_ROOT", str(layout.output_root))
    monkeypatch.chdir(REPO)  # the shipped catalog
    return layout


def test_the_cli_sets_lists_unsets_and_revokes(api, cli_project, capsys):
    layout = cli_project
    built(api, layout, 9300, day(1))
    chain = built(api, layout, 9301, day(2), promoted=True)
    assert run_cli(capsys, "channel", "set", "production", KEY, "9300") == (
        0, f"{KEY}: channel production -> 9300; registry {layout.registry_file}\n", "")
    code, out, _ = run_cli(capsys, "channel", "list")
    assert code == 0 and out.splitlines() == [
        f"{KEY:<24} {'latest':<16} {9301:<8} {template_name(KEY, day(2))}",
        f"{KEY:<24} {'production':<16} {9300:<8} {template_name(KEY, day(1))}"]
    assert run_cli(capsys, "channel", "set", "production", KEY, chain)[1] == (
        f"{KEY}: channel production -> 9301 (taken from 9300); registry {layout.registry_file}\n")
    code, out, _ = run_cli(capsys, "revoke", "9301", "--reason", "bad image")
    assert code == 0 and out == (f"{KEY}: template 9301 ({template_name(KEY, day(2))}) revoked; it was the current "
                                 f"template of {KEY}: the key's next build builds a new one; channels taken: "
                                 f"production; registry {layout.registry_file}\n")
    assert run_cli(capsys, "channel", "list", KEY)[1] == "no channels: no key of debian-12 has a current template\n"
    assert run_cli(capsys, "channel", "unset", "production", KEY)[1] == (
        f"{KEY}: channel production was not set; registry {layout.registry_file}\n")
    jsonschema.validate(json.loads(layout.registry_file.read_text()), registry_schema())


@pytest.mark.parametrize("argv, said", [
    (("channel", "set", "Prod", KEY, "9300"), "packer-assets: bad channel name 'Prod'"),
    (("channel", "set", "production", KEY, "9301"), "packer-assets: debian-12: template 9301"),
    (("channel", "list", "debian-14"), "packer-assets: templates/catalog.yaml: debian-14: unknown template key"),
    (("revoke", "9399"), "packer-assets: 9399: no template of any catalog key"),
    (("revoke", "9301"), "packer-assets: debian-12: template 9301"),
])
def test_the_cli_says_what_is_wrong_in_one_line_and_exits_2(api, cli_project, capsys, argv, said):
    built(api, cli_project, 9301, day(2))
    revoke(cli_project, api, load_catalog(REPO / "templates/catalog.yaml", env={}, project_dir=REPO), "9301")
    state = node_state(api)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and err.startswith(said) and err.count("\n") == 1, err
    assert node_state(api) == state


def test_the_cli_with_a_directory_for_registry_json_says_so_and_changes_nothing(api, cli_project, capsys):
    built(api, cli_project, 9301, day(2), promoted=True)
    cli_project.registry_file.mkdir(parents=True)
    state = node_state(api)
    for argv in (("channel", "set", "production", KEY, "9301"), ("revoke", "9301")):
        assert run_cli(capsys, *argv) == (2, "", f"packer-assets: {cli_project.registry_file} is a directory, not a "
                                                 "file: remove or rename it (the registry is rewritten from the node); "
                                                 "nothing was changed\n")
    assert node_state(api) == state


def test_the_cli_without_make_init_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PACKER_ASSETS_ROOT", str(tmp_path))
    monkeypatch.chdir(REPO)
    code, _, err = run_cli(capsys, "revoke", "9301")
    assert code == 2 and err == (f"packer-assets: {tmp_path}/infra/env/.env.proxmox does not exist: run `make init` "
                                 "(proxmox_env) first\n")



def test_a_registry_write_reads_the_node_only_once_it_holds_the_lock(api, layout, catalog):
    """Two runs of different keys: the one that writes last read the node last, so it never writes an older
    picture over a newer one. The writer is held at the lock (seen waiting in /proc/locks) while the node
    changes; what it writes must be the changed node."""
    built(api, layout, 9300, day(1), promoted=True)
    built(api, layout, 9301, day(2))
    with exclusive(layout.registry_lock):
        writer = threading.Thread(target=write_registry, args=(layout, api, catalog))
        writer.start()
        waiting_for(layout.registry_lock)
        promote(api, NODE, KEY, 9301)  # the other run's promotion, while the writer waits
    writer.join(timeout=60)
    assert not writer.is_alive()
    assert read_registry(layout).templates[KEY].current.vmid == 9301


def waiting_for(lock_file, limit=300.0):  # bounds a failure only
    """Until /proc/locks shows a process blocked on lock_file's flock (`->` lines are waiters)."""
    inode = f":{os.stat(lock_file).st_ino} "
    deadline = time.monotonic() + limit
    while not any("->" in line and "FLOCK" in line and inode in line for line in open("/proc/locks")):
        assert time.monotonic() < deadline, "the writer never waited for the registry lock"
        time.sleep(0.01)
