"""The one way this project writes a file: beside its target, then renamed into place.

A crash, a kill or Ctrl-C mid-write never leaves half a file where a whole one is expected, and
never a hidden partial file beside it.
"""
import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside `path` (same suffix, so that writers that go by the suffix
    accept it); once the block ends without error, it replaces `path`. On error it is removed."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    remove(partial)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        remove(partial)


@contextlib.contextmanager
def opened(path, mode="w", **kwargs):
    """open() of a file that appears, whole, only when the block ends without error."""
    with replacing(path) as partial, open(partial, mode, **kwargs) as f:
        yield f


def write_text(path, text):
    with opened(path, encoding="utf-8") as f:
        f.write(text)


def remove(path):
    """Removes a file or a folder, if there is one."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
