"""The lab guest's SFTP server: a filesystem rooted at the guest's `<state_dir>/files` (lab.guest.LabGuest)."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

if TYPE_CHECKING:
    from .guest import LabGuest


class _Handle(paramiko.SFTPHandle):
    def __init__(self, guest: LabGuest, local: Path, flags: int):
        super().__init__(flags)
        self.guest, self.local, self.writes = guest, local, bool(flags & (os.O_WRONLY | os.O_RDWR))

    def close(self) -> None:
        super().close()
        if self.writes:
            self.guest._uploaded("sftp", self.local)


def _errno(fn):
    """Turn OSError into the SFTP status paramiko expects from an SFTPServerInterface method."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    return wrapper


class LabSftp(paramiko.SFTPServerInterface):
    def __init__(self, server: paramiko.ServerInterface, guest: LabGuest):
        super().__init__(server)
        self.guest = guest

    def canonicalize(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.guest.home, path))

    def _attrs(self, local: Path, name: str | None = None, follow: bool = True):
        attrs = paramiko.SFTPAttributes.from_stat(os.stat(local) if follow else os.lstat(local))
        if name is not None:
            attrs.filename = name
        return attrs

    @_errno
    def list_folder(self, path):
        local = self.guest.local_path(path)
        return [self._attrs(local / n, n) for n in sorted(os.listdir(local))]

    @_errno
    def stat(self, path):
        return self._attrs(self.guest.local_path(path))

    @_errno
    def lstat(self, path):
        return self._attrs(self.guest.local_path(path), follow=False)

    @_errno
    def open(self, path, flags, attr):
        local = self.guest.local_path(path)
        # Created 0600 unless the client asks for a mode (packer's env var file holds the install password).
        fd = os.open(local, flags, 0o600 if attr.st_mode is None else (attr.st_mode & 0o777) | 0o600)
        if flags & os.O_WRONLY:
            mode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            mode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            mode = "rb"
        handle = _Handle(self.guest, local, flags)
        handle.readfile = handle.writefile = os.fdopen(fd, mode)
        return handle

    @_errno
    def remove(self, path):
        os.remove(self.guest.local_path(path))
        return paramiko.SFTP_OK

    @_errno
    def rename(self, oldpath, newpath):
        os.rename(self.guest.local_path(oldpath), self.guest.local_path(newpath))
        return paramiko.SFTP_OK

    @_errno
    def posix_rename(self, oldpath, newpath):
        os.replace(self.guest.local_path(oldpath), self.guest.local_path(newpath))
        return paramiko.SFTP_OK

    @_errno
    def mkdir(self, path, attr):
        os.mkdir(self.guest.local_path(path))
        return paramiko.SFTP_OK

    @_errno
    def rmdir(self, path):
        os.rmdir(self.guest.local_path(path))
        return paramiko.SFTP_OK

    @_errno
    def chattr(self, path, attr):
        # Permissions only (packer chmods uploads); owners and times mean nothing in the lab.
        if attr.st_mode is not None:
            os.chmod(self.guest.local_path(path), (attr.st_mode & 0o777) | 0o600)
        return paramiko.SFTP_OK
