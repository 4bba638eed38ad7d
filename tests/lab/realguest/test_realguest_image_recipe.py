"""The base image's inputs: the machine's Debian mirror (from its apt sources) and the recipe key that
names the cached image. No debootstrap or QEMU needed."""

import re
import textwrap
from pathlib import Path

import pytest

from packer_assets.errors import ConfigError
from packer_assets_lab.realguest import image
from packer_assets_lab.realguest.sources import apt_sources, debian_mirrors, suite_for


def apt_dir(tmp_path, sources_list="", parts=None):
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    (root / "sources.list").write_text(sources_list)
    for name, text in (parts or {}).items():
        (root / "sources.list.d" / name).write_text(textwrap.dedent(text))
    return root


DEB822 = """\
    Types: deb
    # http://snapshot.debian.org/archive/debian/20250520T000000Z
    URIs: http://deb.debian.org/debian
    Suites: bookworm bookworm-updates
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

    Types: deb
    URIs: http://deb.debian.org/debian-security
    Suites: bookworm-security
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
    """


def test_a_deb822_machine_like_this_one(tmp_path):
    root = apt_dir(tmp_path, parts={
        "debian.sources": DEB822,
        "google-cloud-sdk.list.disabled-by-farm": "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
    })
    mirrors = debian_mirrors(apt_root=root)
    assert mirrors.mirror == "http://deb.debian.org/debian"
    assert mirrors.lines == ("deb http://deb.debian.org/debian bookworm main",
                             "deb http://deb.debian.org/debian bookworm-updates main",
                             "deb http://deb.debian.org/debian-security bookworm-security main")


def test_one_line_sources_with_options_comments_and_other_suites(tmp_path):
    root = apt_dir(tmp_path, sources_list=textwrap.dedent("""\
        # deb http://commented.example/debian bookworm main
        deb-src http://src.example/debian bookworm main
        deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian/ bookworm main contrib
        deb http://mirror.example/debian bookworm-updates main
        deb http://security.example/debian-security bookworm-security main
        """), parts={"other.list": "deb http://other.example/apt stable main\n",
                     "off.sources": "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n"})
    assert [s.uri for s in apt_sources(root)] == ["http://mirror.example/debian", "http://mirror.example/debian",
                                                  "http://security.example/debian-security", "http://other.example/apt"]
    mirrors = debian_mirrors(apt_root=root)
    assert mirrors.mirror == "http://mirror.example/debian"
    assert mirrors.lines[-1] == "deb http://security.example/debian-security bookworm-security main"


def test_an_override_wins_and_no_debian_source_is_a_clear_error(tmp_path):
    root = apt_dir(tmp_path, sources_list="deb http://other.example/apt stable main\n")
    with pytest.raises(LookupError, match="no apt source for bookworm or another Debian release"):
        debian_mirrors(apt_root=root)
    assert debian_mirrors(mirror="http://local.example/debian/", apt_root=root).lines == (
        "deb http://local.example/debian bookworm main",)


def test_trixie_comes_from_the_archives_a_bookworm_machine_names(tmp_path):
    """Issue 27: this machine names bookworm only; the same archives serve trixie, its updates and its security
    fixes (each pocket from where the machine gets bookworm's)."""
    mirrors = debian_mirrors("trixie", apt_root=apt_dir(tmp_path, parts={"debian.sources": DEB822}))
    assert mirrors.mirror == "http://deb.debian.org/debian"
    assert mirrors.lines == ("deb http://deb.debian.org/debian trixie main",
                             "deb http://deb.debian.org/debian trixie-updates main",
                             "deb http://deb.debian.org/debian-security trixie-security main")


def test_a_suite_the_machine_names_itself_comes_from_there(tmp_path):
    root = apt_dir(tmp_path, sources_list=textwrap.dedent("""\
        deb http://mirror.example/debian bookworm main
        deb http://mirror.example/debian bookworm-security main
        deb http://trixie.example/debian trixie main
        deb http://trixie.example/debian-security trixie-security main
        """))
    assert debian_mirrors("trixie", apt_root=root).lines == (
        "deb http://trixie.example/debian trixie main",
        "deb http://trixie.example/debian-security trixie-security main")  # no -updates line anywhere


@pytest.mark.parametrize(("os_id", "version_id", "suite"), [("debian", "12", "bookworm"), ("debian", "13", "trixie")])
def test_the_keys_release_picks_the_suite_and_the_suite_is_in_the_recipe(tmp_path, os_id, version_id, suite):
    assert suite_for(f"debian-{version_id}", os_id, version_id) == suite
    root = apt_dir(tmp_path, parts={"debian.sources": DEB822})
    spec = image.recipe(suite=suite, apt_root=root)
    assert spec["suite"] == suite and spec["apt_lines"][0] == f"deb http://deb.debian.org/debian {suite} main"
    other = image.recipe(suite={"bookworm": "trixie", "trixie": "bookworm"}[suite], apt_root=root)
    assert image.recipe_key(spec) != image.recipe_key(other)  # the two images live side by side in the cache


@pytest.mark.parametrize(("key", "os_id", "version_id"), [("debian-11", "debian", "11"), ("rocky-9", "rocky", "9"),
                                                          ("debian-any", "debian", None)])
def test_any_other_release_is_one_line_naming_the_key(key, os_id, version_id):
    with pytest.raises(ConfigError) as err:
        suite_for(key, os_id, version_id)
    message = str(err.value)
    assert message.startswith(f"--real-guest {key}: the lab's real guest is Debian 12 (bookworm) or 13 (trixie)")
    assert f"{key} expects {os_id} {version_id or '(any release)'}" in message and "\n" not in message


def test_the_recipe_key_follows_what_shapes_the_image(tmp_path):
    root = apt_dir(tmp_path, parts={"debian.sources": DEB822})
    key = image.recipe_key(image.recipe(apt_root=root))
    assert key == image.recipe_key(image.recipe(apt_root=root))
    assert len(key) == 64
    # the package list, in any order, is part of it
    assert image.recipe_key(image.recipe(packages=tuple(reversed(image.PACKAGES)), apt_root=root)) == key
    assert image.recipe_key(image.recipe(packages=(*image.PACKAGES, "curl"), apt_root=root)) != key
    assert image.recipe_key(image.recipe(packages=image.PACKAGES[1:], apt_root=root)) != key
    # and the mirror, the configure script and the suite
    assert image.recipe_key(image.recipe(mirror="http://local.example/debian", apt_root=root)) != key
    assert image.recipe_key(image.recipe(script=image.CONFIGURE_SCRIPT + "true\n", apt_root=root)) != key


def test_the_image_holds_none_of_the_templates_packages_and_enables_nothing_of_it():
    # templates/debian/preseed.cfg.j2: tasksel's ssh-server task and pkgsel/include are the installer's to install
    template = {"openssh-server", "qemu-guest-agent", "cloud-init", "sudo"}
    assert not template & set(image.PACKAGES)
    assert {"linux-image-amd64", "systemd-sysv", "udev"} <= set(image.PACKAGES)
    # it enables only its own boot's units; no SSH host key logic (openssh-server's postinst makes them)
    assert re.findall(r"(?m)^systemctl enable (.*)$", image.CONFIGURE_SCRIPT) == [
        "systemd-networkd serial-getty@ttyS0.service"]
    assert "ssh-keygen" not in image.CONFIGURE_SCRIPT and "ssh_host" not in image.CONFIGURE_SCRIPT
    # each package the image adds to debootstrap's minbase says why, beside it
    source = Path(image.__file__).read_text()
    for package in image.SYSTEM_PACKAGES:
        assert re.search(rf'"{re.escape(package)}",  # \S', source), f"{package}: no reason given"


def test_a_cached_image_is_reused_without_building(tmp_path, monkeypatch):
    root = apt_dir(tmp_path, parts={"debian.sources": DEB822})
    cache = tmp_path / "cache"
    folder = cache / image.recipe_key(image.recipe(apt_root=root))
    folder.mkdir(parents=True)
    (folder / image.MANIFEST_NAME).write_text('{"cmdline": "root=UUID=x ro console=ttyS0,115200n8"}')
    monkeypatch.setattr(image, "_build", lambda *a, **k: pytest.fail("rebuilt a cached image"))
    built = image.ensure_base_image(cache=cache, apt_root=root, progress=None)
    assert built.folder == folder and built.disk == folder / "disk.qcow2"
    assert built.cmdline.startswith("root=UUID=x")


def test_a_failed_build_leaves_no_folder_and_leftovers_of_a_killed_one_are_removed(tmp_path, monkeypatch):
    root = apt_dir(tmp_path, parts={"debian.sources": DEB822})
    cache = tmp_path / "cache"
    key = image.recipe_key(image.recipe(apt_root=root))
    (cache / f".build-{key}-99999999").mkdir(parents=True)  # what a kill -9 mid-build leaves
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)

    def failing(work, spec, progress, started):
        (work / "half-an-image").write_text("x")
        raise image.ImageBuildError("base image: debootstrap failed")
    monkeypatch.setattr(image, "_build", failing)
    with pytest.raises(image.ImageBuildError):
        image.ensure_base_image(cache=cache, apt_root=root, progress=None)
    assert sorted(p.name for p in cache.iterdir()) == [f".{key}.lock"]


def test_two_builders_do_not_race_the_second_waits_and_reuses(tmp_path, monkeypatch):
    import threading
    root = apt_dir(tmp_path, parts={"debian.sources": DEB822})
    cache = tmp_path / "cache"
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    release, builds, said = threading.Event(), [], []

    def slow_build(work, spec, progress, started):
        builds.append(work)
        assert release.wait(60)
        (work / image.MANIFEST_NAME).write_text('{"cmdline": "root=UUID=y ro"}')
    monkeypatch.setattr(image, "_build", slow_build)
    first = threading.Thread(target=image.ensure_base_image, kwargs={"cache": cache, "apt_root": root, "progress": None})
    first.start()
    while not builds:
        first.join(0.05)
    second: list = []
    waiter = threading.Thread(target=lambda: second.append(
        image.ensure_base_image(cache=cache, apt_root=root, progress=said.append)))
    waiter.start()
    while not said:  # the second builder says it waits before it blocks on the lock
        waiter.join(0.05)
    release.set()
    first.join(60)
    waiter.join(60)
    assert len(builds) == 1
    assert "waiting" in said[0] and second[0].cmdline == "root=UUID=y ro"
