"""Paths as users write them, and the rule that no command writes over what it reads.

expand(): `~` and environment variables expanded as a shell would (a YAML config is not a shell).
refuse_writing_over(): an output that is one of the command's inputs (the same file, a hard link or a
symlink to it) or lies inside an input folder is refused before anything is written."""

import os
from pathlib import Path

from .errors import UserError


def expand(path):
    """`~`, `~user` and `$VAR` / `${VAR}` expanded; anything that is not a string comes back as it is."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    text = os.fspath(path)
    return os.path.expandvars(os.path.expanduser(text))


def local(path):
    """The resolved local path of a model or data reference, or None for what is not on this machine (a hub
    id, a `PATH@WEIGHT` spec's path is taken as given)."""
    if path is None:
        return None
    p = Path(expand(path))
    return p.resolve() if p.exists() else None


def same(a: Path, b: Path):
    """a and b are one file or folder (the same inode: hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def inside(path: Path, folder: Path):
    """path is folder or lies below it (both resolved: symlinks followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def refuse_writing_over(out, inputs, flag="--out"):
    """Refuse to write `out` when it is one of `inputs` (files or folders: (what, path) pairs), the same file
    by another name, or inside an input folder."""
    out = Path(expand(out))
    for what, path in inputs:
        src = local(path)
        if src is None:
            continue
        if out.exists() and same(out, src):
            raise UserError(f"{flag} {out} is {what} {path} (the same file); it would be overwritten: "
                            f"write the output somewhere else")
        if src.is_dir() and inside(out, src):
            raise UserError(f"{flag} {out} is inside {what} {path}; an output there would be read as input "
                            f"next time: write it somewhere else")
