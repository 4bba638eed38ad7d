"""Storage transfer as PVE does it: download-url and upload that keep the real bytes.

LabTransfer, a mixin of LabPve, replaces fakepve's download-url (which records a file without
fetching it) with one that really fetches the URL, verifies the checksum in the task and keeps the
bytes under `data_dir`, and fakepve's upload (which records the size only) with one that keeps them
too. The checks, task logs and messages follow pve-storage / pve-common (API2/Storage/Status.pm,
PVE::Tools::download_file_from_url), including wget's exit codes.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from fakepve.model import PveError, TaskError
from fakepve.routing import die, param_error, split_list
from fakepve.schema import Match
from fakepve.server import API, USER, ok, params
from fakepve.storage import _is_file

from packer_assets.evidence.layout import file_digest

# Where a content type lives below a directory storage (PVE::Storage::Plugin's get_subdir).
CONTENT_DIRS = {"iso": "template/iso", "vztmpl": "template/cache", "import": "import"}
EXTENSIONS = {
    "iso": r"\.(?:iso|img)$",
    "vztmpl": r"\.tar\.(?:gz|xz|zst|bz2)$",
    "import": r"\.(?:ova|ovf|qcow2|raw|vmdk)$",
}
HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
CHUNK = 1024 * 1024
# wget's exit codes, which PVE reports: network failure, TLS failure, error answer from the server.
WGET_NETWORK, WGET_TLS, WGET_SERVER = 4, 5, 8


def normalize_content_filename(name: str) -> str:
    """PVE::Storage::normalize_content_filename: the base name, unsafe characters replaced by '_'."""
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", re.sub(r"^.*[/\\]", "", name.strip("\n")))


def encode_text(text: str) -> str:
    """PVE::Tools::encode_text, for a task's worker id."""
    return re.sub(r"[\x00-\x1f\x7f-\xff:\\]", lambda m: f"\\x{ord(m.group(0)):02x}", text)


def parse_multipart(body: bytes, content_type: str | None) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """The form fields and the file part ((filename, bytes) or None) of a multipart/form-data body."""
    found = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not found:
        raise PveError(400, "bad upload request")
    fields, upload = {}, None
    for part in body.split(b"--" + found.group(1).encode())[1:-1]:
        head, _, data = part[2:].partition(b"\r\n\r\n")
        data = data[:-2] if data.endswith(b"\r\n") else data
        head = head.decode("utf-8", "replace")
        name = re.search(r'(?<!file)name="([^"]*)"', head)
        filename = re.search(r'filename="([^"]*)"', head)
        if filename:
            upload = (filename.group(1), data)
        elif name:
            fields[name.group(1)] = data.decode("utf-8", "replace")
    return fields, upload


class LabTransfer:
    """Mixin: download-url and upload that keep the real bytes under `data_dir`.

    `downloads` lists every download that ended in a stored file, `failed_downloads` the others
    (dicts with url, storage, filename, size, checksum, ...), so tests can tell what was fetched.
    """

    def _init_transfer(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.downloads: list[dict[str, Any]] = []
        self.failed_downloads: list[dict[str, Any]] = []

    def content_file(self, storage: str, content: str, filename: str) -> Path:
        """Where the lab keeps the bytes of a file volume (it need not exist)."""
        return self.data_dir / storage / CONTENT_DIRS[content] / filename

    def volume_file(self, volid: str) -> Path | None:
        """The bytes of a volume such as 'local:iso/debian.iso' on disk, or None if there are none."""
        storage, _, volname = volid.partition(":")
        content, _, filename = volname.partition("/")
        kind = content if content in CONTENT_DIRS else None
        path = self.content_file(storage, kind, filename) if kind and filename else None
        return path if path is not None and path.is_file() and self._has_volume(storage, kind, filename) else None

    def _has_volume(self, storage: str, content: str, filename: str) -> bool:
        return storage in self.storages and f"{content}/{filename}" in self._volumes(storage)

    def _forget_volume(self, storage: str, content: str, filename: str) -> None:
        """Drop a volume's record (before it is written again), giving back its space."""
        store = self.storages[storage]
        vol = store.get("volumes", {}).pop(f"{content}/{filename}", None)
        store["files"].discard(filename)
        if vol and "avail" in store:
            store["avail"] += int(vol.get("size") or 0)

    def _keep(self, storage: str, content: str, filename: str, tmp: Path, size: int) -> None:
        """Register the volume, then move the finished temporary file into place."""
        path = self.content_file(storage, content, filename)
        if self._has_volume(storage, content, filename):
            self._forget_volume(storage, content, filename)
        self.store_file(storage, filename, size, content)  # TaskError if the storage is full
        os.replace(tmp, path)

    def _target(self, v: dict[str, Any], verb: str) -> tuple[dict[str, Any], str, str, str]:
        """The checks PVE makes before it forks the worker: (store, content, filename, PVE's path)."""
        name = v["storage"]
        store = self._active_store(name, v["node"])
        content = v["content"]
        if verb == "download":
            if not _is_file(store):
                raise die(f"can't upload to storage type '{store.get('type')}', not a file based storage!")
            if content not in split_list(store.get("content")):
                raise die(f"storage '{name}' is not configured for content-type '{content}'")
        elif not _is_file(store):
            raise die(f"can't upload to storage type '{store.get('type')}'")
        filename = normalize_content_filename(v["filename"])
        if not re.search(EXTENSIONS[content], filename, re.IGNORECASE):
            raise param_error(
                filename="invalid filename or wrong extension" if content == "import" else "wrong file extension"
            )
        if verb == "upload" and content not in split_list(store.get("content")):
            raise die(f"storage '{name}' does not support '{content}' content")
        pve_path = f"{self._base_path(name)}/{CONTENT_DIRS[content]}/{filename}"
        self.content_file(name, content, filename).parent.mkdir(parents=True, exist_ok=True)
        return store, content, filename, pve_path

    def _worker_log(self, first_line: str) -> list[str]:
        """The log of the task started with this first line.

        fakepve's task() copies the initial log list but not its strings, so the very string object
        identifies the record; the worker appends its lines there as PVE's worker prints them.
        """
        for record in reversed(self.tasklog):
            if record["log"] and record["log"][0] is first_line:
                return record["log"]
        raise LookupError("task record not found")

    # ------------------------------------------------------------- download

    async def _download_url(self, request: web.Request) -> web.Response:
        user = request[USER]

        async def call(_match: Match, values: dict[str, Any]) -> str:
            return await self._download(values, user)

        return ok(await self.answer(request, self.resolve(request, API), await params(request), user, call))

    async def _download(self, v: dict[str, Any], user: str) -> str:
        _store, content, filename, pve_path = self._target(v, "download")
        name, url = v["storage"], v["url"]
        algorithm, expected = v.get("checksum-algorithm"), v.get("checksum")
        first = f"downloading {url} to {pve_path}"

        async def body() -> str:
            log = self._worker_log(first)
            if v.get("compression"):
                if content != "iso":
                    raise TaskError(f"decompression not supported for {content}")
                raise TaskError("no decompression method found")  # the lab does not decompress
            path = self.content_file(name, content, filename)
            if path.is_file() and self._has_volume(name, content, filename):
                return self._existing(path, pve_path, algorithm, expected, log)
            tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
            try:
                size, got = await self._fetch(url, tmp, algorithm, bool(v.get("verify-certificates", 1)), pve_path, log)
                if algorithm:
                    if got.lower() != expected.lower():
                        log.append("calculating checksum...")
                        raise TaskError(f"checksum mismatch: got '{got}' != expect '{expected}'")
                    log.append("calculating checksum...OK, checksum verified")
                self._keep(name, content, filename, tmp, size)
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                self.failed_downloads.append(self._download_entry(v, filename, None, expected, str(e)))
                raise
            self.downloads.append(self._download_entry(v, filename, size, expected, None))
            return f"download of '{url}' to '{pve_path}' finished"

        return await self.task(v["node"], "download", encode_text(filename), user, body, log=[first])

    @staticmethod
    def _download_entry(
        v: dict[str, Any], filename: str, size: int | None, checksum: str | None, error: str | None
    ) -> dict[str, Any]:
        return {
            "url": v["url"],
            "storage": v["storage"],
            "content": v["content"],
            "filename": filename,
            "size": size,
            "checksum": checksum,
            "checksum-algorithm": v.get("checksum-algorithm"),
            "error": error,
        }

    @staticmethod
    def _existing(path: Path, pve_path: str, algorithm: str | None, expected: str | None, log: list[str]) -> str:
        """download_file_from_url when the file is there: keep it if the checksum matches, else refuse."""
        if not algorithm:
            raise TaskError(f"refusing to override existing file '{pve_path}'")
        got = file_digest(path, algorithm)
        if got.lower() != expected.lower():
            log.append("calculating checksum of existing file...")
            raise TaskError(f"checksum mismatch: got '{got}' != expect '{expected}', aborting")
        return "calculating checksum of existing file...OK, got correct file already, no need to download"

    @staticmethod
    async def _fetch(
        url: str, tmp: Path, algorithm: str | None, verify: bool, pve_path: str, log: list[str]
    ) -> tuple[int, str | None]:
        """Stream url into tmp, hashing on the way: (size, hex digest or None). Errors as PVE's wget ones."""
        digest = hashlib.new(algorithm) if algorithm else None
        size = 0
        wget = f"wget --progress=dot:giga -O {pve_path}.tmp.{os.getpid()} {url}"
        # Like wget: no proxies from the environment, no compressed transfer encoding.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
                session.get(url, ssl=bool(verify), headers={"Accept-Encoding": "identity"}) as resp,
            ):
                if resp.status >= 400:
                    log.append(f"ERROR {resp.status}: {resp.reason}.")
                    raise TaskError(f"download failed: command '{wget}' failed: exit code {WGET_SERVER}")
                # Plain blocking writes of 1 MiB chunks to a local file: the lab's event loop can afford them.
                with open(tmp, "wb") as out:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
                        if digest:
                            digest.update(chunk)
        except (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError) as e:
            log.append(f"ERROR: cannot verify certificate: {e}")
            raise TaskError(f"download failed: command '{wget}' failed: exit code {WGET_TLS}") from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.append(f"failed: {e}.")
            raise TaskError(f"download failed: command '{wget}' failed: exit code {WGET_NETWORK}") from e
        log.append(f"{size} bytes received")
        return size, digest.hexdigest() if digest else None

    # --------------------------------------------------------------- upload

    async def _upload(self, request: web.Request) -> web.Response:
        # fakepve's upload records the size only, and checks neither the schema nor a checksum.
        user = request[USER]
        fields, upload = parse_multipart(await request.read(), request.headers.get("Content-Type"))
        if upload is None:
            raise PveError(400, "bad upload request")
        fields["filename"] = upload[0]
        self.uploaded = dict(fields, data=upload[1])

        async def call(_match: Match, values: dict[str, Any]) -> str:
            return await self._store_upload(values, upload[1], user)

        return ok(await self.answer(request, self.resolve(request, API), fields, user, call))

    async def _store_upload(self, v: dict[str, Any], data: bytes, user: str) -> str:
        _store, content, filename, pve_path = self._target(v, "upload")
        name = v["storage"]
        tmpname = "/var/tmp/pveupload-" + uuid.uuid4().hex  # where PVE's HTTP server would have spooled it
        first = "starting file import from: " + tmpname

        async def body() -> str:
            log = self._worker_log(first)
            algorithm, expected = v.get("checksum-algorithm"), v.get("checksum")
            if algorithm:
                got = hashlib.new(algorithm, data).hexdigest()
                if got.lower() != expected.lower():
                    log.append("calculating checksum...")
                    raise TaskError(f"checksum mismatch: got '{got}' != expect '{expected}'")
                log.append("calculating checksum...OK, checksum verified")
            log += [
                "target node: " + v["node"],
                "target file: " + pve_path,
                f"file size is: {len(data)}",
                f"command: cp -- {tmpname} {pve_path}",
            ]
            path = self.content_file(name, content, filename)
            tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
            try:
                tmp.write_bytes(data)
                self._keep(name, content, filename, tmp, len(data))  # PVE overwrites an existing file
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return "finished file import successfully"

        return await self.task(v["node"], "imgcopy", "", user, body, log=[first])
