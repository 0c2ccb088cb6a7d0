"""ComfyUI's input/output/temp folders, kept in memory, with its naming rules.

Paths are POSIX-normalised the way ComfyUI's os.path calls do on Linux, and a
path that would leave its folder raises :class:`PathEscape`.
"""

from __future__ import annotations

import hashlib
import posixpath

FOLDER_TYPES = ("output", "input", "temp")


class PathEscape(ValueError):
    """A subfolder or filename that points outside its folder."""


def _relative(subfolder: str, filename: str = "") -> str:
    path = posixpath.normpath(posixpath.join(subfolder or ".", filename))
    if path == ".." or path.startswith(("../", "/")):
        raise PathEscape(path)
    return "" if path == "." else path


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """Split ComfyUI's "name.png [output]" form into (name, folder type or None)."""
    for folder in FOLDER_TYPES:
        suffix = f" [{folder}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], folder
    return name, None


class FileStore:
    """In-memory files per folder type, keyed by normalised relative path.

    Generated files (output/ and temp/) are capped at `max_generated`: the oldest
    go first, so a long soak cannot grow without bound. Uploads (input/) are
    capped at `max_input_bytes` in all, the oldest first (the newest is always
    kept), so a daemon forwarding every upload cannot fill our memory either.
    """

    def __init__(self, max_generated: int = 5000, max_input_bytes: int = 256 * 1024**2) -> None:
        self._files: dict[str, dict[str, bytes]] = {folder: {} for folder in FOLDER_TYPES}
        self._max_generated = max_generated
        self._generated: dict[tuple[str, str], None] = {}  # insertion-ordered
        self._max_input_bytes = max_input_bytes
        self.input_bytes = 0

    def get(self, folder: str, subfolder: str, filename: str) -> bytes | None:
        """The file's bytes, or None (also for paths that escape the folder)."""
        try:
            return self._files[folder].get(_relative(subfolder, filename))
        except PathEscape:
            return None

    def put(self, folder: str, subfolder: str, filename: str, data: bytes) -> None:
        """Create or replace a file."""
        path = _relative(subfolder, filename)
        if folder == "input":
            self._put_input(path, data)
            return
        self._files[folder][path] = data
        self._generated.pop((folder, path), None)
        self._generated[(folder, path)] = None
        while len(self._generated) > self._max_generated:
            old_folder, old_path = next(iter(self._generated))
            del self._generated[(old_folder, old_path)]
            self._files[old_folder].pop(old_path, None)

    def _put_input(self, path: str, data: bytes) -> None:
        inputs = self._files["input"]
        old = inputs.pop(path, None)  # re-inserted: the newest again
        self.input_bytes += len(data) - (len(old) if old is not None else 0)
        inputs[path] = data
        while self.input_bytes > self._max_input_bytes and len(inputs) > 1:
            oldest = next(iter(inputs))
            self.input_bytes -= len(inputs.pop(oldest))

    def clear(self, folder: str) -> None:
        """Forget every file in one folder (ComfyUI wipes temp/ on start-up)."""
        self._files[folder].clear()
        if folder == "input":
            self.input_bytes = 0
        self._generated = {k: v for k, v in self._generated.items() if k[0] != folder}

    def count(self) -> int:
        """How many files the store holds."""
        return sum(len(files) for files in self._files.values())

    def names_in(self, folder: str, subfolder: str = "") -> list[str]:
        """File names directly inside a subfolder (like os.listdir, files only)."""
        base = _relative(subfolder)
        prefix = f"{base}/" if base else ""
        return [
            path[len(prefix) :]
            for path in self._files[folder]
            if path.startswith(prefix) and "/" not in path[len(prefix) :]
        ]

    def save_path(self, filename_prefix: str) -> tuple[str, str]:
        """(subfolder, base name) for a SaveImage prefix such as "portraits/cat"."""
        normal = posixpath.normpath(filename_prefix)
        subfolder = posixpath.dirname(normal)
        try:
            _relative(subfolder)
        except PathEscape:
            raise PathEscape(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {subfolder}"
                f"\n         output_dir: /output"
            ) from None
        return subfolder, posixpath.basename(normal)

    def next_counter(self, folder: str, subfolder: str, name: str) -> int:
        """The next `{name}_{counter:05}_.png` counter: highest existing one + 1."""
        best = 0
        for existing in self.names_in(folder, subfolder):
            head = existing[: len(name) + 1]
            if head[:-1].lower() != name.lower() or head[-1:] != "_":
                continue
            try:
                digits = int(existing[len(name) + 1 :].split("_")[0])
            except ValueError:
                digits = 0
            best = max(best, digits)
        return best + 1

    def upload(
        self, folder: str, subfolder: str, filename: str, data: bytes, *, overwrite: bool
    ) -> str:
        """Store an upload the way /upload/image does; returns the name it got.

        Identical bytes under a taken name keep that name; different bytes get
        "name (1).ext", "name (2).ext"... unless `overwrite`.
        """
        stem, ext = posixpath.splitext(filename)
        name = filename
        if not overwrite:
            digest = hashlib.sha256(data).digest()
            i = 1
            while (existing := self.get(folder, subfolder, name)) is not None:
                if hashlib.sha256(existing).digest() == digest:
                    return name
                name = f"{stem} ({i}){ext}"
                i += 1
        self.put(folder, subfolder, name, data)
        return name

    def check_inside(self, subfolder: str, filename: str = "") -> None:
        """Raise PathEscape if subfolder/filename leaves its folder."""
        _relative(subfolder, filename)
