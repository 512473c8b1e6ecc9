"""The official zip layout: ``train.zip`` + ``train_map.txt``, ``val.zip`` + ``val_map.txt``.

A map line is ``<member path> <label>`` separated by a tab (the official files) or spaces, e.g.
``n01440764/n01440764_10026.JPEG\t0``; the member may also carry the official ``train.zip@/`` prefix.
"""
import os
import posixpath
import zipfile

from errors import DataError


def read_map_file(map_path: str, zip_name: str) -> list[tuple[str, int]]:
    """[(member, label)] from a map file; DataError naming the file and line for a malformed line."""
    entries = []
    prefix = zip_name + '@'
    with open(map_path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                raise DataError(f"{map_path} line {line_no}: expected '<path> <label>', got {line!r}")
            member = parts[0][len(prefix):] if parts[0].startswith(prefix) else parts[0]
            entries.append((member.lstrip('/'), int(parts[1])))
    return entries


def class_names(entries: list[tuple[str, int]], num_classes: int) -> list[str]:
    """Class names from the members' folder names (n01440764/...) when every label has exactly one folder
    and folders are distinct; otherwise the label numbers as strings."""
    folders = {}
    for member, label in entries:
        folders.setdefault(label, set()).add(posixpath.basename(posixpath.dirname(member)))
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else '' for i in range(num_classes)]
    if all(names) and len(set(names)) == num_classes:
        return names
    return [str(i) for i in range(num_classes)]


class ZipReader:
    """Reads members of one zip file. The ZipFile handle is opened lazily in each process (a handle
    inherited over fork shares its file offset with the parent) and never pickled."""

    def __init__(self, path):
        self.path = path
        self._zip, self._pid = None, None

    def _handle(self):
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path, 'r'), os.getpid()
        return self._zip

    def read(self, member):
        return self._handle().read(member)

    def contains(self, member):
        try:
            self._handle().getinfo(member)
        except KeyError:
            return False
        return True

    def close(self):
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._zip, self._pid = None, None

    def __getstate__(self):
        return {'path': self.path, '_zip': None, '_pid': None}
