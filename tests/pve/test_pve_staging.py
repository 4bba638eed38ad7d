"""Staging against the lab over HTTPS: the node downloads from the lab mirror and verifies; uploads are
verified while streaming; failures leave no volume; old releases are pruned."""

import hashlib
import io
import socket

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")

from support import REPO
from support.mirror import LAB_MIRROR_ITEMS, signed_catalog

from packer_assets.catalog import IsoSource, TemplateEntry
from packer_assets.upstream.checksums import Checksum
from packer_assets_lab.iso import make_iso
from packer_assets_lab.mirror import MirrorItem
from packer_assets.pve.bootstrap import BootstrapConfig, bootstrap
from packer_assets.pve.client import Endpoint, connect
from packer_assets.pve.staging import (
    ChecksumMismatch,
    HashingReader,
    StagingError,
    iso_volumes,
    release_filename,
    stage_entry,
    stage_iso,
    upload_iso,
)
from packer_assets.pve.tasks import follow_task

NODE, STORAGE = "pve1", "local"
VIRTIO = "/fedorapeople.org/groups/virt/virtio-win/direct-downloads/stable-virtio"
FAST = {"poll_interval": 0.05, "timeout": 30}


@pytest.fixture
def mirror_items():
    return [*LAB_MIRROR_ITEMS, MirrorItem("windows-2022--virtio", f"{VIRTIO}/virtio-win.iso", f"{VIRTIO}/SHA256SUMS")]


@pytest.fixture
def build_api(lab_pve, lab_pki):
    """The build token a bootstrap creates (PackerBuilder role, privilege-separated): what staging runs as."""
    endpoint = Endpoint(lab_pve.url, ca_file=str(lab_pki.ca_file))
    result = bootstrap(endpoint, "root@pam", admin_password=lab_pve.root_password, known_secret=None,
                       config=BootstrapConfig())
    assert (result.discovery.node, result.discovery.iso_storage) == (NODE, STORAGE)
    return connect(endpoint, "automation@pve", token_name="packer", token_secret=result.token_secret)


def source(mirror, key):
    item = mirror.items[key]
    return IsoSource(url="https:/" + item.iso_path, checksum_url="https:/" + item.checksum_path
                     ).with_mirror(mirror.base_url)


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_filename_keeps_iso_last():
    checksum = Checksum("sha256", "0123456789abcdef" * 4)
    assert release_filename("ubuntu-22.04.5-live-server-amd64.iso", checksum) == \
        "ubuntu-22.04.5-live-server-amd64.0123456789ab.iso"


def test_node_downloads_and_verifies_with_the_build_token(build_api, lab_pve, iso_mirror):
    lab_pve.time_scale = 0.001  # the task runs after download-url answered, as on a real node
    lines = []
    staged = stage_iso(build_api, NODE, STORAGE, source(iso_mirror, "ubuntu-2204"), on_progress=lines.append, **FAST)
    want = iso_mirror.sha256("ubuntu-2204")
    assert staged.volid == f"local:iso/ubuntu-22.04.5-live-server-amd64.{want[:12]}.iso"
    assert (staged.checksum, staged.algorithm, staged.downloaded) == (want, "sha256", True)
    assert staged.bytes_through_control_host == 0
    assert staged.source == iso_mirror.url("ubuntu-2204")  # the mirrored URL, not upstream
    assert staged.upid.startswith("UPID:pve1:") and staged.seconds >= 0
    stored = lab_pve.volume_file(staged.volid)
    assert sha256_of(stored) == want and staged.size == stored.stat().st_size
    (download,) = lab_pve.downloads
    assert (download["checksum"], download["checksum-algorithm"]) == (want, "sha256")
    assert any("checksum verified" in line for line in lines)  # progress came from the task log
    assert staged.metadata()["volid"] == staged.volid


def test_second_run_downloads_nothing(build_api, lab_pve, iso_mirror):
    iso = source(iso_mirror, "debian-12")
    first = stage_iso(build_api, NODE, STORAGE, iso, **FAST)
    again = stage_iso(build_api, NODE, STORAGE, iso, **FAST)
    assert again.volid == first.volid and again.size == first.size
    assert (again.downloaded, again.upid, again.bytes_through_control_host) == (False, None, 0)
    assert len(lab_pve.downloads) == 1 and iso_mirror.downloads("debian-12") == 1


def test_a_new_release_gets_a_new_volume_and_keeps_the_old(pve_root, lab_pve, iso_mirror):
    iso = source(iso_mirror, "rocky-9")
    old = stage_iso(pve_root, NODE, STORAGE, iso, **FAST)
    iso_mirror.publish("rocky-9")
    new = stage_iso(pve_root, NODE, STORAGE, iso, **FAST)
    assert new.volid != old.volid and new.checksum == iso_mirror.sha256("rocky-9")
    assert {old.volid, new.volid} <= set(iso_volumes(pve_root, NODE, STORAGE))
    assert sha256_of(lab_pve.volume_file(old.volid)) == old.checksum  # untouched


def test_corrupt_image_fails_with_the_mismatch_and_leaves_no_volume(build_api, lab_pve, iso_mirror):
    iso = source(iso_mirror, "ubuntu-2204")
    iso_mirror.corrupt("ubuntu-2204")
    with pytest.raises(StagingError) as err:
        stage_iso(build_api, NODE, STORAGE, iso, **FAST)
    message = str(err.value)
    assert "checksum mismatch" in message and "UPID:pve1:" in message and "no volume was left" in message
    volid = f"local:iso/{release_filename(iso.filename, Checksum('sha256', iso_mirror.sha256('ubuntu-2204')))}"
    assert volid not in iso_volumes(build_api, NODE, STORAGE) and lab_pve.volume_file(volid) is None
    assert lab_pve.downloads == [] and len(lab_pve.failed_downloads) == 1


def test_refused_download_url_is_a_staging_error(pve_root, lab_pve, iso_mirror):
    lab_pve.fail("POST", f"/nodes/{NODE}/storage/{STORAGE}/download-url", 500, "storage is on fire")
    with pytest.raises(StagingError, match="refused download-url .* storage is on fire"):
        stage_iso(pve_root, NODE, STORAGE, source(iso_mirror, "debian-12"), **FAST)


def test_a_task_that_does_not_finish_times_out(pve_root, lab_pve, iso_mirror):
    lab_pve.time_scale = 0.001
    with socket.socket() as hang:  # the node connects and waits forever for an answer
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        iso = IsoSource(url=f"http://127.0.0.1:{hang.getsockname()[1]}/x.iso", checksum="sha256:" + "ab" * 32)
        with pytest.raises(StagingError, match=r"did not finish within 1s .* no volume was left"):
            stage_iso(pve_root, NODE, STORAGE, iso, timeout=1, poll_interval=0.05)


def test_extra_isos_are_staged_the_same_way(build_api, lab_pve, iso_mirror):
    windows_url = "https:/" + iso_mirror.items["windows-2022"].iso_path
    entry = TemplateEntry.model_validate({
        "key": "windows-2022", "family": "windows",
        # the lab swaps Windows' pinned checksum for the mirror's SHA256SUMS next to the ISO
        "iso": {"url": windows_url, "checksum_url": windows_url.rsplit("/", 1)[0] + "/SHA256SUMS"},
        "extra_isos": [{"name": "virtio", "url": "https:/" + VIRTIO + "/virtio-win.iso",
                        "checksum_url": "https:/" + VIRTIO + "/SHA256SUMS"}],
        "hardware": {"cores": 2, "memory": 4096, "disk": "64G", "bios": "ovmf", "efi": True, "tpm": True,
                     "os_type": "win11"},
        "vmid_range": {"first": 9500, "last": 9599}, "packer_dir": "templates/windows",
        "install_user": {"name": "packer", "password_env": "PACKER_INSTALL_PASSWORD"}, "retention": 2,
    })
    for iso in entry.all_isos():
        iso._mirror = iso_mirror.base_url
    staged = stage_entry(build_api, NODE, STORAGE, entry, **FAST)
    assert sorted(staged) == ["iso", "virtio"]
    assert staged["virtio"].checksum == iso_mirror.sha256("windows-2022--virtio")
    assert staged["virtio"].volid.startswith("local:iso/virtio-win.")
    for item in staged.values():
        assert sha256_of(lab_pve.volume_file(item.volid)) == item.checksum
    assert len(lab_pve.downloads) == 2


# ------------------------------------------------------------------ upload from the control host


def answer_iso(tmp_path, size_pad=0):
    """A generated ISO (like the Windows answer ISO) and its checksum, computed when it was made."""
    path = make_iso(tmp_path / "autounattend.iso", "ANSWERS", {"Autounattend.xml": b"<unattend/>" + b" " * size_pad})
    return path, Checksum("sha256", sha256_of(path))


def test_upload_streams_verified_and_lands_intact(build_api, lab_pve, tmp_path):
    path, checksum = answer_iso(tmp_path)
    staged = upload_iso(build_api, NODE, STORAGE, path, checksum, filename="win2022-answers.iso", **FAST)
    assert staged.volid == f"local:iso/win2022-answers.{checksum.short}.iso"
    assert staged.bytes_through_control_host == path.stat().st_size == staged.size
    assert sha256_of(lab_pve.volume_file(staged.volid)) == checksum.hex
    assert (lab_pve.uploaded["checksum"], lab_pve.uploaded["checksum-algorithm"]) == (checksum.hex, "sha256")
    again = upload_iso(build_api, NODE, STORAGE, path, checksum, filename="win2022-answers.iso", **FAST)
    assert (again.downloaded, again.bytes_through_control_host, again.volid) == (False, 0, staged.volid)


def test_large_upload_streams_through_the_multipart_encoder(pve_root, lab_pve, tmp_path):
    path, checksum = answer_iso(tmp_path, size_pad=11 << 20)  # above proxmoxer's 10 MiB streaming threshold
    staged = upload_iso(pve_root, NODE, STORAGE, path, checksum, **FAST)
    assert sha256_of(lab_pve.volume_file(staged.volid)) == checksum.hex


@pytest.mark.parametrize("pad", [0, 11 << 20], ids=["in-memory", "streamed"])
def test_upload_refuses_a_file_whose_bytes_do_not_match(pve_root, lab_pve, tmp_path, pad):
    path, checksum = answer_iso(tmp_path, size_pad=pad)
    wrong = Checksum("sha256", hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(StagingError) as err:
        upload_iso(pve_root, NODE, STORAGE, path, wrong, **FAST)
    message = str(err.value)
    assert "refused to upload" in message and checksum.hex in message and wrong.hex in message
    assert "no volume was left" in message
    assert not [v for v in iso_volumes(pve_root, NODE, STORAGE) if "autounattend" in v]
    assert getattr(lab_pve, "uploaded", None) is None  # the node never received a complete upload


def test_hashing_reader_reads_once_and_withholds_the_last_block_on_mismatch(tmp_path):
    path = tmp_path / "f.iso"
    path.write_bytes(b"x" * 10_000)
    good = Checksum("sha256", sha256_of(path))
    with HashingReader(path, good) as reader:
        assert reader.seek(0, io.SEEK_END) == 10_000 and reader.seek(0) == 0  # size probe, no read
        assert len(reader.read(4096)) == 4096
        with pytest.raises(io.UnsupportedOperation):
            reader.seek(0)
            reader.read(10)
        reader.seek(4096)
        assert len(reader.read()) == 10_000 - 4096 and reader.verified and reader.read() == b""
    bad = Checksum("sha256", "00" * 32)
    with HashingReader(path, bad) as reader:
        got = reader.read(4096) + reader.read(4096)
        with pytest.raises(ChecksumMismatch, match="expected 0000"):
            reader.read(4096)
        assert len(got) == 8192 and not reader.verified


def test_follow_task_passes_every_log_line(pve_root, lab_pve, iso_mirror):
    iso = source(iso_mirror, "rocky-9")
    upid = pve_root.nodes(NODE).storage(STORAGE)("download-url").post(
        url=iso.effective_url, content="iso", filename="plain.iso")
    lines = []
    status = follow_task(pve_root, upid, timeout=120, on_progress=lines.append, poll=0.05, log_interval=0.1)
    assert status["exitstatus"] == "OK"
    assert [entry["t"] for entry in pve_root.nodes(NODE).tasks(upid).log.get(limit=1000)] == lines


SIGNED = "/cdimage.debian.org/debian-cd/13.2.0/amd64/iso-cd"


def test_a_signed_checksum_file_is_verified_with_the_mirrors_key_and_a_tampered_one_fails_in_one_line(
        build_api, lab_pve, tmp_path):
    """Debian's shape (SHA256SUMS + detached SHA256SUMS.sign, upstream keyring keys/debian-cd.asc): the lab mirror
    re-signs with its own key, PACKER_ASSETS_ISO_MIRROR_KEYRING names that keyring, staging verifies and
    downloads; a checksum file changed on the mirror after signing fails before any download, in one line."""
    from packer_assets.catalog import MIRROR_KEYRING_ENV, load_catalog
    from packer_assets.upstream.checksums import ChecksumError
    from packer_assets_lab.mirror import IsoMirror

    item = MirrorItem("debian-13", f"{SIGNED}/debian-13.2.0-amd64-netinst.iso", f"{SIGNED}/SHA256SUMS",
                      signature_path=f"{SIGNED}/SHA256SUMS.sign")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/debian-cd.asc").write_bytes((REPO / "templates/keys/debian-cd.asc").read_bytes())
    (tmp_path / "catalog.yaml").write_text(signed_catalog("debian-13", item, "keys/debian-cd.asc", item.signature_path))
    with IsoMirror(tmp_path / "mirror", [item]) as mirror:
        env = {"PACKER_ASSETS_ISO_MIRROR": mirror.base_url, MIRROR_KEYRING_ENV: str(mirror.signing_key.keyring)}
        iso = load_catalog(tmp_path / "catalog.yaml", env=env, project_dir=tmp_path).get("debian-13").iso
        staged = stage_iso(build_api, NODE, STORAGE, iso, **FAST)
        assert staged.checksum == mirror.sha256("debian-13") and staged.downloaded
        assert mirror.hits[(item.signature_path, 200)] == 1
        mirror.publish("debian-13")
        mirror.tamper_checksums("debian-13")
        with pytest.raises(ChecksumError) as err:
            stage_iso(build_api, NODE, STORAGE, iso, **FAST)
        url = mirror.checksum_url("debian-13")
    message = str(err.value)
    assert message.startswith(f"{url}: signature verification against {mirror.signing_key.keyring} failed: BADSIG")
    assert "BADSIG" in message and "\n" not in message
    assert len(lab_pve.downloads) == 1  # nothing fetched on a checksum file that failed its signature
