"""Ingest archives: a ZIP of images checked from its central directory, then read by manifest paths.

Nothing in an archive is trusted: absolute paths, paths escaping the archive, symbolic links, encrypted
members and members expanding like a zip bomb are refused, and every member is read with a size cap.
"""
import posixpath
import re
import stat
import zipfile
import zlib

from django.conf import settings
from django.core.exceptions import ValidationError

# Members this small cannot be a bomb whatever their ratio (a README, an empty file).
BOMB_MIN_BYTES = 1024 * 1024


def _member_path(name: str) -> str | None:
    """The member's path with "/" separators, or None if it is absolute or escapes the archive."""
    name = name.replace("\\", "/")
    if not name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None
    if ".." in name.split("/"):
        return None
    return posixpath.normpath(name)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_bomb(info: zipfile.ZipInfo) -> bool:
    if info.file_size <= BOMB_MIN_BYTES:
        return False
    return info.file_size > max(info.compress_size, 1) * settings.INGEST_MAX_COMPRESSION_RATIO


def archive_check(file) -> None:
    """ValidationError unless `file` is a ZIP this service will read: no member with an absolute path or
    one that escapes the archive, no symbolic link, at most INGEST_MAX_FILES files and
    INGEST_MAX_ARCHIVE_BYTES uncompressed, no member expanding over INGEST_MAX_COMPRESSION_RATIO times.

    Only the central directory is read here; members are read later with a size cap of their own.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ValidationError({"archive": f"the archive is not a readable ZIP file ({exc})"}) from None
    files = [info for info in members if not info.is_dir()]
    if len(files) > settings.INGEST_MAX_FILES:
        raise ValidationError({"archive": f"the archive holds {len(files)} files, over the limit of "
                                          f"{settings.INGEST_MAX_FILES}; split it into several jobs"})
    total = sum(info.file_size for info in files)
    if total > settings.INGEST_MAX_ARCHIVE_BYTES:
        raise ValidationError({"archive": f"the archive expands to {total / 1e6:.1f} MB, over the limit of "
                                          f"{settings.INGEST_MAX_ARCHIVE_BYTES / 1e6:.1f} MB; split it into "
                                          "several jobs"})
    for info in members:
        shown = info.filename[:200]
        if _member_path(info.filename) is None:
            raise ValidationError({"archive": f"the archive holds {shown!r}, a path outside the archive; "
                                              "nothing was imported"})
        if _is_symlink(info):
            raise ValidationError({"archive": f"the archive holds {shown!r}, a symbolic link; links are not "
                                              "followed, so nothing was imported"})
        if _is_bomb(info):
            raise ValidationError({"archive": f"{shown!r} in the archive expands "
                                              f"{info.file_size / max(info.compress_size, 1):.0f} times, over the "
                                              f"{settings.INGEST_MAX_COMPRESSION_RATIO}:1 limit (the mark of a zip "
                                              "bomb); nothing was imported"})


class ArchiveReader:
    """Reads images out of a stored ZIP by the paths a manifest gives, never trusting its headers."""

    def __init__(self, file):
        self._file = file
        self._zip = zipfile.ZipFile(file)
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            path = _member_path(info.filename)
            if path is not None and not info.is_dir() and not _is_symlink(info):
                self._members[path] = info
        # An archive of a folder: "images/a.jpg" also finds "catalog/images/a.jpg".
        tops = {path.split("/", 1)[0] for path in self._members}
        self._prefix = f"{tops.pop()}/" if len(tops) == 1 and all("/" in p for p in self._members) else ""

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def read(self, path: str) -> bytes:
        name = _member_path(path.strip())
        if name is None:
            raise ValidationError({"image": f"{path[:200]!r} is not a path inside the archive"})
        info = self._members.get(name) or self._members.get(self._prefix + name)
        if info is None:
            raise ValidationError({"image": f"{path[:200]} is not in the archive"})
        cap = settings.MAX_UPLOAD_BYTES
        too_large = {"image": f"{path[:200]} is over the {cap / 1e6:.1f} MB limit for an image"}
        if info.flag_bits & 0x1:
            raise ValidationError({"image": f"{path[:200]} is encrypted in the archive; archives with a "
                                            "password cannot be read"})
        if info.file_size > cap:
            raise ValidationError(too_large)
        if _is_bomb(info):
            raise ValidationError({"image": f"{path[:200]} expands over the {settings.INGEST_MAX_COMPRESSION_RATIO}:1 "
                                            "limit (the mark of a zip bomb)"})
        try:
            with self._zip.open(info) as member:
                data = member.read(cap + 1)  # the header's size is a claim; this bound is not
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise ValidationError({"image": f"{path[:200]} cannot be read from the archive ({exc})"}) from None
        if len(data) > cap:
            raise ValidationError(too_large)
        return data
