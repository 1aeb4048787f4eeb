"""Resume checkpoints on the project's DVC remote (the default remote `dvc push` uses, through DVC's own config and
credentials), so a run outlives its machine: rank 0 uploads each checkpoint in the background, a rerun elsewhere
downloads the newest one of the same run. Layout: <remote>/sft-checkpoints/<sft|base>/<fingerprint>/step-<N>.pt, then
its marker step-<N>.json (size, sha256) written last; a reader takes only bytes its marker vouches for. No torch."""
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from pipeline.common import print0

PREFIX = "sft-checkpoints"
WAIT_S = 600.0  # the longest the end of training waits for the last upload


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class RemoteStore:
    """One run's checkpoint folder on the remote. A failure warns once (later ones are silent) and never raises:
    training goes on with its local checkpoint."""
    fs: object  # a dvc_objects filesystem (local folder, S3, ...)
    root: str  # <remote path>/sft-checkpoints/<desc: sft | base>/<fingerprint>
    where: str  # the remote's name and URL, for messages
    desc: str
    note: Path | None = None  # written once the remote answers: the finished run deletes its checkpoints there
    noted: bool = False
    warned: bool = False

    def reached(self) -> None:
        if self.note is not None and not self.noted:  # (over a note an earlier run of other params left)
            self.noted = True
            self.note.parent.mkdir(parents=True, exist_ok=True)
            self.note.write_text(json.dumps({"desc": self.desc, "fingerprint": self.fs.name(self.root)}) + "\n")

    def warn(self, what: str, e: Exception) -> None:
        if not self.warned:
            self.warned = True
            print0(f"{self.desc}: {what} on DVC remote {self.where} failed ({type(e).__name__}: {str(e)[:200]}); "
                   "training goes on with its local checkpoint only (later remote failures are not reported)")

    def path(self, step: int, ext: str) -> str:
        return self.fs.join(self.root, f"step-{step:09d}.{ext}")

    def markers(self) -> list[dict]:
        """The complete checkpoints' markers, newest first (a marker cut short is skipped)."""
        try:
            paths = list(self.fs.find(self.root))
        except FileNotFoundError:
            paths = []
        self.reached()
        found = []
        for p in paths:
            if self.fs.name(p).startswith("step-") and p.endswith(".json"):
                try:
                    meta = json.loads(self.fs.cat_file(p))
                except (ValueError, OSError):
                    continue
                if isinstance(meta, dict) and {"step", "size", "sha256"} <= meta.keys():
                    found.append(meta)
        return sorted(found, key=lambda m: m["step"], reverse=True)

    def upload(self, local: Path, step: int, keep: int) -> None:
        """The data object first, its marker last; then older checkpoints beyond the newest `keep` go."""
        try:
            meta = {"step": step, "size": local.stat().st_size, "sha256": file_sha256(local)}
            data, marker = self.path(step, "pt"), self.path(step, "json")
            self.fs.makedirs(self.root, exist_ok=True)  # a folder remote needs it; object stores ignore it
            if self.fs.exists(marker):  # a rerun uploading a step again: no marker may vouch for bytes in flight
                self.fs.rm(marker)
            self.reached()
            self.fs.put_file(str(local), data)
            self.fs.pipe_file(marker, json.dumps(meta).encode())
            self.prune(keep)
        except Exception as e:  # noqa: BLE001  (any backend's error: warn, keep training)
            self.warn(f"uploading the step-{step} checkpoint", e)

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints, and any data object without a marker (an upload
        cut short). Markers go before their data, so a reader never finds a marker without its bytes."""
        kept = {m["step"] for m in self.markers()[:keep]}
        try:
            paths = list(self.fs.find(self.root))
        except FileNotFoundError:
            return
        doomed = [p for p in paths if not any(self.fs.name(p) == f"step-{s:09d}.{e}" for s in kept for e in
                                                ("pt", "json"))]
        for p in sorted(doomed, key=lambda p: not p.endswith(".json")):  # markers first
            self.fs.rm(p)
        if not kept and self.fs.exists(self.root):  # a folder remote keeps the empty folder
            self.fs.rm(self.root, recursive=True)

    def download(self, local: Path) -> int | None:
        """The newest complete checkpoint into `local` (write-then-rename); its step, or None when there is none."""
        try:
            for meta in self.markers():
                data = self.path(meta["step"], "pt")
                try:
                    if self.fs.info(data)["size"] != meta["size"]:
                        continue
                except FileNotFoundError:
                    continue
                tmp = local.with_name(f".{local.name}.download")
                local.parent.mkdir(parents=True, exist_ok=True)
                try:
                    t0 = time.time()
                    self.fs.get_file(data, str(tmp))
                    if file_sha256(tmp) != meta["sha256"]:
                        print0(f"{self.desc}: remote checkpoint {data} does not match its marker; skipping it")
                        continue
                    os.replace(tmp, local)
                finally:
                    tmp.unlink(missing_ok=True)
                print0(f"{self.desc}: downloaded the step-{meta['step']} checkpoint from DVC remote {self.where} "
                       f"({meta['size'] / 2**20:,.1f} MiB in {time.time() - t0:,.1f}s)")
                return meta["step"]
        except Exception as e:  # noqa: BLE001
            self.warn("looking for a checkpoint", e)
        return None


def open_store(desc: str, fingerprint: str) -> RemoteStore | None:
    """The run's folder on the default DVC remote of the project around the working directory; None (with one line)
    when there is no DVC project or no default remote."""
    try:
        from dvc.fs import get_cloud_fs
        from dvc.repo import Repo

        with Repo() as repo:
            name = repo.config["core"].get("remote")
            if not name:
                print0(f"{desc}: train.remote_checkpoints is set but the DVC project has no default remote (`dvc "
                       "remote add -d NAME URL`); checkpoints stay local")
                return None
            cls, config, path = get_cloud_fs(repo.config, name=name)
            url = repo.config["remote"][name].get("url", path)
        fs = cls(**config)
    except Exception as e:  # noqa: BLE001  (no DVC project, a bad remote config, a missing plugin)
        print0(f"{desc}: cannot open the DVC remote for checkpoints ({type(e).__name__}: {str(e)[:200]}); "
               "checkpoints stay local")
        return None
    return RemoteStore(fs, fs.join(path, PREFIX, desc, fingerprint), f"{name} ({url})", desc)


class Uploader:
    """One background thread uploading checkpoints; at most one waits (a newer checkpoint replaces a waiting one).
    Each is a hard link (else a copy) taken at submit, since the next save replaces the checkpoint file."""

    def __init__(self, store: RemoteStore, keep: int):
        self.store, self.keep = store, keep
        self.cond = threading.Condition()
        self.pending: tuple[Path, int] | None = None
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="remote-checkpoints", daemon=True)
        self.thread.start()

    def submit(self, path: Path, step: int) -> None:
        snapshot = path.with_name(f".{path.name}.upload-{step}")
        snapshot.unlink(missing_ok=True)
        try:
            os.link(path, snapshot)
        except OSError:
            shutil.copyfile(path, snapshot)
        with self.cond:
            if self.pending is not None:
                self.pending[0].unlink(missing_ok=True)
            self.pending = (snapshot, step)
            self.cond.notify()

    def _work(self) -> None:
        while True:
            with self.cond:
                while self.pending is None and not self.closing:
                    self.cond.wait()
                if self.pending is None:
                    return
                (snapshot, step), self.pending = self.pending, None
            try:
                self.store.upload(snapshot, step, max(1, self.keep))
            finally:
                snapshot.unlink(missing_ok=True)

    def close(self, timeout: float = WAIT_S) -> None:
        """Finish the waiting upload, at most `timeout` seconds; past that the process leaves it unfinished (no
        marker: the remote keeps vouching for its previous checkpoint only)."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        t0 = time.time()
        self.thread.join(timeout)
        if self.thread.is_alive():
            print0(f"{self.store.desc}: the last checkpoint upload to {self.store.where} is still running after "
                   f"{timeout:.0f}s; not waiting for it")
        elif time.time() - t0 > 1:
            print0(f"{self.store.desc}: waited {time.time() - t0:,.1f}s for the last checkpoint upload")


def finish(desc: str, fingerprint: str, keep: int) -> None:
    """After the model folder is written: the run's remote checkpoints go, but for the newest `keep`."""
    store = open_store(desc, fingerprint)
    if store is None:
        return
    try:
        store.prune(keep)
    except Exception as e:  # noqa: BLE001
        store.warn("deleting the finished run's checkpoints", e)
