"""Atomic writes (temp file or folder, then rename) and the clean-up of temps a killed writer left behind."""
import os
import shutil
from pathlib import Path


def atomic_write(path, write_fn):
    """write_fn(tmp_path) then rename: a kill mid-write never leaves a half file under `path`.

    A SIGKILL can leave the hidden temp file (.<name>.tmp<pid>) beside it; remove_stale_temps clears it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_fn(str(tmp))
        with open(tmp, "rb+") as f:   # on disk before the rename makes it visible (power loss, not only kills)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """A safetensors file, written atomically. Serialised in memory, not by safetensors' save_file: that
    one (0.8+) writes through a temp file of its own (.tmpXXXXXX) that a kill leaves behind, unclaimed."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_dir(path, write_fn):
    """write_fn(tmp_folder) then swap it in: readers see the old folder or the new one, never a half one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f".{path.name}.{tag}{os.getpid()}") for tag in ("tmp", "old"))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_fn(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder, name_glob: str) -> list:
    """Delete the temp files atomic_write left in `folder` for targets matching name_glob (glob.escape a
    plain name) when their writer was killed; the temp file of a live writer on this machine stays."""
    removed = []
    for tmp in Path(folder).glob(f".{name_glob}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True
