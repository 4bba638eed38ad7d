"""Staging ISOs on a node's ISO storage through the API: what `prestage-iso.sh` did, release-aware.

- A staged volume is named `<stem>.<first 12 hex of its checksum>.iso` (`.iso` stays last: PVE
  requires it), so a new upstream release gets a new volume and never overwrites the ISO an
  existing template was built from. The same name therefore means the same checksum: when the
  volume is listed already, nothing is transferred.
- From a URL, the node downloads it itself (`download-url` with `checksum` + `checksum-algorithm`):
  the node verifies, no ISO byte passes through the control host.
- From a local file (a local ISO, the generated answer ISO), it is uploaded with the checksum
  verified while streaming: `HashingReader` hashes each block as the upload reads it, and refuses
  to hand over the last block if the digest does not match, so a wrong file is never completed on
  the node; the node is given the checksum too and verifies what it received.
- A failed task (checksum mismatch, network, full storage) raises `StagingError` with the task's
  exit status and UPID, after making sure no volume of that name is left behind.

Works with the PackerBuilder role's privileges (Datastore.AllocateTemplate, Datastore.Audit, and
Sys.AccessNetwork on PVE 9), except pruning: deleting a volume needs Datastore.Allocate on the storage.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from proxmoxer.core import ResourceException

from packer_assets.catalog import IsoSource, TemplateEntry
from packer_assets.errors import OperationError
from packer_assets.pve.client import PveApi
from packer_assets.pve.tasks import Progress, TaskError, TaskTimeout, follow_task, run_task, said
from packer_assets.upstream.checksums import ChecksumFile, resolve_checksum
from packer_assets.upstream.digests import Checksum


class StagingError(OperationError):
    """Staging failed; the message names the volume, and for a task its UPID and exit status."""


class ChecksumMismatch(OperationError, ValueError):
    """Raised by HashingReader at the end of the file (also a ValueError, so urllib3 does not retry it)."""


@dataclass(frozen=True)
class StagedIso:
    volid: str  # storage:iso/<stem>.<12 hex>.iso
    size: int
    checksum: str  # hex
    algorithm: str
    source: str  # the URL the node downloaded from, or the local path uploaded
    seconds: float
    bytes_through_control_host: int  # 0 for download-url and for an ISO already there
    downloaded: bool  # bytes moved in this call (download or upload); False: it was there already
    upid: str | None = None

    def metadata(self) -> dict[str, str | int | float | bool | None]:
        """JSON-friendly values for asset metadata."""
        return asdict(self)


def release_filename(filename: str, checksum: Checksum) -> str:
    """`ubuntu.iso` + sha256 `0123456789abcdef...` -> `ubuntu.0123456789ab.iso`."""
    stem = filename[:-4] if filename.lower().endswith(".iso") else filename
    return f"{stem}.{checksum.short}.iso"


def iso_volumes(api: PveApi, node: str, storage: str) -> dict[str, dict[str, Any]]:
    """volid -> content entry (size, ctime, ...) of the ISOs on the storage."""
    try:
        items = api.nodes(node).storage(storage).content.get(content="iso")
    except ResourceException as exc:
        raise StagingError(f"{node}/{storage}: cannot list ISO content: {said(exc)}") from None
    return {item["volid"]: item for item in items}


def _volid(storage: str, filename: str) -> str:
    return f"{storage}:iso/{filename}"


def _finish_task(
    api: PveApi,
    node: str,
    storage: str,
    upid: str,
    volid: str,
    what: str,
    *,
    timeout: float,
    on_progress: Progress | None,
    poll_interval: float,
) -> None:
    """Wait; on failure make sure the node left no volume, then raise with exit status and UPID."""
    try:
        status = follow_task(api, upid, timeout=timeout, on_progress=on_progress, poll=poll_interval)
    except TaskTimeout as exc:
        raise StagingError(f"{volid}: {what}: {exc}{_cleanup(api, node, storage, volid)}") from None
    if status.get("exitstatus") != "OK":
        raise StagingError(
            f"{volid}: {what} task {upid} failed: {status.get('exitstatus')}{_cleanup(api, node, storage, volid)}"
        )


def _cleanup(api: PveApi, node: str, storage: str, volid: str) -> str:
    """Remove volid if a failed transfer left it; returns a note for the error message."""
    try:
        if volid not in iso_volumes(api, node, storage):
            return "; no volume was left"
        delete_volume(api, node, storage, volid)
        return "; the volume it left was removed"
    except (StagingError, ResourceException) as exc:
        return f"; a volume may be left and could not be removed: {exc}"


def delete_volume(api: PveApi, node: str, storage: str, volid: str, timeout: float = 120) -> None:
    try:
        # quoted: a volid holds ':' and '/', which must stay one path segment
        upid = api.nodes(node).storage(storage).content(quote(volid, safe="")).delete()
    except ResourceException as exc:
        hint = f" (needs Datastore.Allocate on /storage/{storage})" if exc.status_code == 403 else ""
        raise StagingError(f"{volid}: cannot delete: {said(exc)}{hint}") from None
    if upid:
        try:
            run_task(api, upid, f"{volid}: delete", timeout, poll=0.2)
        except TaskError as exc:
            raise StagingError(str(exc)) from None


# ------------------------------------------------------------------ download-url


def stage_iso(
    api: PveApi,
    node: str,
    storage: str,
    iso: IsoSource,
    checksum: Checksum | None = None,
    *,
    timeout: float = 3600,
    on_progress: Progress | None = None,
    poll_interval: float = 1.0,
    cache: MutableMapping[str, ChecksumFile] | None = None,
) -> StagedIso:
    """Have the node download iso (its effective, i.e. mirrored, URL) and verify it against checksum
    (resolved from the catalog when not given). Nothing is downloaded when the release is there."""
    started = time.monotonic()
    checksum = checksum or resolve_checksum(
        iso, cache=cache, keyring=iso.signature_keyring, signature_url=iso.signature_url
    )
    filename = release_filename(iso.filename, checksum)
    volid, url = _volid(storage, filename), iso.effective_url
    found = iso_volumes(api, node, storage).get(volid)
    if found is None:
        try:
            upid = (
                api.nodes(node)
                .storage(storage)("download-url")
                .post(
                    url=url,
                    content="iso",
                    filename=filename,
                    checksum=checksum.hex,
                    **{"checksum-algorithm": checksum.algorithm},
                )
            )
        except ResourceException as exc:
            raise StagingError(f"{volid}: {node} refused download-url of {url}: {said(exc)}") from None
        except requests.RequestException as exc:
            raise StagingError(f"{volid}: download-url of {url} could not be requested: {exc}") from None
        _finish_task(
            api,
            node,
            storage,
            upid,
            volid,
            f"download of {url}",
            timeout=timeout,
            on_progress=on_progress,
            poll_interval=poll_interval,
        )
        found = _must_exist(api, node, storage, volid, upid)
    else:
        upid = None
    return StagedIso(
        volid,
        int(found.get("size") or 0),
        checksum.hex,
        checksum.algorithm,
        url,
        round(time.monotonic() - started, 3),
        0,
        upid is not None,
        upid,
    )


def _must_exist(api: PveApi, node: str, storage: str, volid: str, upid: str) -> dict[str, Any]:
    found = iso_volumes(api, node, storage).get(volid)
    if found is None:
        raise StagingError(f"{volid}: task {upid} ended OK but the volume is not listed on {node}/{storage}")
    return found


def stage_entry(
    api: PveApi,
    node: str,
    storage: str,
    entry: TemplateEntry,
    checksums: Mapping[str, Checksum] | None = None,
    **options: Any,
) -> dict[str, StagedIso]:
    """The boot ISO (as "iso") and every extra ISO (by its name), each staged like stage_iso.

    checksums: known values by the same names (e.g. from the sensor); the rest are resolved, one
    fetch per checksum file."""
    checksums = checksums or {}
    if any(extra.name == "iso" for extra in entry.extra_isos):
        raise StagingError(f"{entry.key}: an extra ISO is named 'iso', the name of the boot ISO here; rename it")
    cache: dict[str, ChecksumFile] = {}
    out = {}
    for iso in entry.all_isos():
        name = getattr(iso, "name", "iso")
        out[name] = stage_iso(api, node, storage, iso, checksums.get(name), cache=cache, **options)
    return out


# ------------------------------------------------------------------ upload from the control host


class HashingReader(io.RawIOBase):
    """Reads a file once, front to back, hashing every block as it is handed out.

    When the last block has been read the digest is compared with `expected`; on a mismatch that
    block is withheld and ChecksumMismatch raised, so an upload reading from here never completes.
    `len` and `name` are what requests/requests-toolbelt use for Content-Length and the part's file
    name. seek/tell only move a logical position (proxmoxer measures the size that way); reading
    anywhere but where hashing stopped is refused, since the digest would then be wrong.
    """

    def __init__(self, path: str | os.PathLike[str], expected: Checksum, name: str | None = None):
        super().__init__()
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.len = os.fstat(self._file.fileno()).st_size
        self.name = name or self.path.name
        self.expected = expected
        self._hash = hashlib.new(expected.algorithm)
        self._pos = self._done = 0
        self.digest: str | None = None
        self.mismatch: str | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.len}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        left = self.len - self._done
        buf = bytearray(left if size is None or size < 0 else min(size, left))
        view, got = memoryview(buf), 0
        while True:  # fill it: requests reads a small upload with one read() and sends what it gets
            n = self.readinto(view[got:])
            got += n
            if not n or got == len(buf):
                break
        return bytes(buf) if got == len(buf) else bytes(buf[:got])

    def readinto(self, buffer: Any) -> int:  # a writable buffer (bytearray, memoryview)
        if self._pos != self._done:
            raise io.UnsupportedOperation(f"{self.path}: read at {self._pos} after {self._done} bytes were hashed")
        view = memoryview(buffer).cast("B")[: self.len - self._done]
        if len(view) == 0:
            if self._done == self.len:
                self._finish()
            return 0
        n = self._file.readinto(view)
        if not n:
            raise ChecksumMismatch(f"{self.path}: file shrank to {self._done} bytes while reading (was {self.len})")
        self._hash.update(view[:n])
        self._done += n
        self._pos = self._done
        if self._done == self.len:
            self._finish()  # raises before the last block is handed out
        return n

    def _finish(self) -> None:
        if self.digest is None:
            self.digest = self._hash.hexdigest()
            if self.digest != self.expected.hex:
                self.mismatch = (
                    f"{self.path}: {self.expected.algorithm} of its {self.len} bytes is {self.digest}, "
                    f"expected {self.expected.hex}"
                )
        if self.mismatch:
            raise ChecksumMismatch(self.mismatch)

    @property
    def verified(self) -> bool:
        return self.digest is not None and self.mismatch is None

    def close(self) -> None:
        self._file.close()
        super().close()


def upload_iso(
    api: PveApi,
    node: str,
    storage: str,
    path: str | os.PathLike[str],
    checksum: Checksum,
    *,
    filename: str | None = None,
    timeout: float = 600,
    on_progress: Progress | None = None,
    poll_interval: float = 1.0,
) -> StagedIso:
    """Upload a local ISO whose checksum is known (pinned, or computed when the file was generated).

    filename: the name on the storage before the release fragment (default: the file's name).
    """
    started = time.monotonic()
    source = Path(path)
    target = release_filename(filename or source.name, checksum)
    volid = _volid(storage, target)
    found = iso_volumes(api, node, storage).get(volid)
    if found is not None:
        return StagedIso(
            volid,
            int(found.get("size") or 0),
            checksum.hex,
            checksum.algorithm,
            str(source),
            round(time.monotonic() - started, 3),
            0,
            False,
        )
    try:
        reader = HashingReader(source, checksum, name=target)
    except OSError as exc:
        raise StagingError(f"{volid}: cannot read {source}: {exc.strerror or exc}") from None
    with reader:
        try:
            upid = (
                api.nodes(node)
                .storage(storage)
                .upload.post(
                    content="iso", filename=reader, checksum=checksum.hex, **{"checksum-algorithm": checksum.algorithm}
                )
            )
        except ChecksumMismatch as exc:
            raise StagingError(
                f"{volid}: refused to upload: {exc}; the upload was cut off before its last block"
                f"{_cleanup(api, node, storage, volid)}"
            ) from None
        except ResourceException as exc:
            raise StagingError(f"{volid}: {node} refused the upload of {source}: {said(exc)}") from None
        except requests.RequestException as exc:
            raise StagingError(
                f"{volid}: the upload of {source} failed: {exc}{_cleanup(api, node, storage, volid)}"
            ) from None
        if not reader.verified:  # the request ended without reading the whole file
            raise StagingError(
                f"{volid}: the upload read {reader.tell()} of {reader.len} bytes of {source}"
                f"{_cleanup(api, node, storage, volid)}"
            )
        sent = reader.len
    _finish_task(
        api,
        node,
        storage,
        upid,
        volid,
        f"upload of {source}",
        timeout=timeout,
        on_progress=on_progress,
        poll_interval=poll_interval,
    )
    found = _must_exist(api, node, storage, volid, upid)
    return StagedIso(
        volid,
        int(found.get("size") or 0),
        checksum.hex,
        checksum.algorithm,
        str(source),
        round(time.monotonic() - started, 3),
        sent,
        True,
        upid,
    )
