"""Getting a model from a Hugging Face hub into the models root.

`Puller.pull(spec, emit)` lists the repo (huggingface_hub honours HF_ENDPOINT and
HF_TOKEN), picks the model file for this board and the files that belong beside it,
checks free disk space, downloads into a hidden staging folder `<root>/.pull-<id>/`
(a cut download resumes from its `.partial` file there), checks
every file against the digest the hub publishes, then renames the staging folder to
`<root>/<id>/` in one step: the registry never sees half a model. A refused or
corrupted pull removes its staging folder; a pull cut by the network keeps it, so
the next pull of the same model resumes.

Progress goes to `emit(dict)` as Ollama's pull objects (status, digest, total,
completed). Failures raise PullError with a sentence that says what to do.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from rkllm_api.models.registry import normalise_id

BOARDS = ("rk3588", "rk3576")
# Files that belong beside a model: its vision encoder, tokenizer, chat template, configs.
_COMPANION = re.compile(r"(\.rknn|tokenizer[^/]*|[^/]*config\.json|[^/]*\.jinja|"
                        r"special_tokens_map\.json|vocab\.[a-z]+|merges\.txt)$", re.IGNORECASE)
_SDK_VERSION = re.compile(r"(?:^|[-_ .v])(\d+)\.(\d+)\.(\d+)(?=$|[-_ .])")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DISK_MARGIN = 64 * 1024 * 1024        # left free beyond the model: logs, KV snapshots
PROGRESS_INTERVAL = 0.25              # seconds between two progress events of one file
STAGING_PREFIX = ".pull-"


class PullError(Exception):
    """A pull that cannot go on; `status` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int = 400, code: str = "pull_failed"):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str = ""      # LFS files: the hub publishes their sha256
    blob_id: str = ""     # small files: their git blob id (sha1 of "blob <size>\0" + bytes)

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}" if self.sha256 else f"git-sha1:{self.blob_id}"


@dataclass(frozen=True)
class Board:
    soc: str = ""                 # rk3588 | rk3576 | "" (not a Rockchip board)
    sdk_versions: tuple = ()      # what the installed librkllmrt says it is ("1.2.1", ...)


def parse_spec(spec) -> tuple:
    """"owner/name" or "owner/name/path/in/repo.rkllm" (an "hf.co/" or
    "https://huggingface.co/" prefix is allowed) -> (repo, file or "")."""
    if not isinstance(spec, str) or not spec.strip():
        raise PullError("name a Hugging Face repo: 'owner/name' or 'owner/name/file.rkllm'",
                        code="invalid_model")
    text = re.sub(r"^(?:https?://)?(?:hf\.co|huggingface\.co)/", "", spec.strip())
    parts = text.split("/")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    if not _REPO.match(repo) or ".." in parts or any(not p for p in parts[2:]):
        raise PullError(f"{spec!r} is not a Hugging Face repo: use 'owner/name' or "
                        f"'owner/name/file.rkllm'", code="invalid_model")
    return repo, file


def choose_files(files: list, board: Board, wanted: str = "") -> tuple:
    """(model file, companion files) for this board; PullError listing what the repo
    has when no file fits or several do."""
    models = [f for f in files if f.path.lower().endswith(".rkllm")]
    if wanted:
        chosen = [f for f in files if f.path == wanted]
        if not chosen:
            raise PullError(f"the repo has no file {wanted!r}; it has: "
                            f"{_names(models) or _names(files)}", status=404, code="file_not_found")
        if not wanted.lower().endswith((".rkllm", ".gguf")):
            raise PullError(f"{wanted!r} is not a model file (.rkllm or .gguf)", code="not_a_model")
        return chosen[0], _companions(files, chosen[0], board)
    if not models:
        raise PullError(f"the repo holds no .rkllm model; it has: {_names(files)}. Name a file "
                        f"with owner/name/FILE", status=404, code="no_model_file")
    fitting = _for_soc(models, board.soc)
    fitting = _for_sdk(fitting, board.sdk_versions)
    if not fitting:
        raise PullError(f"no file in the repo is for this board ({board.soc or 'unknown board'}"
                        f"{', librkllmrt ' + '/'.join(board.sdk_versions) if board.sdk_versions else ''}); "
                        f"it has: {_names(models)}. Pick one with owner/name/FILE",
                        status=404, code="no_file_for_board")
    if len(fitting) > 1:
        raise PullError(f"the repo has several models for this board: {_names(fitting)}; "
                        f"pick one with owner/name/FILE", code="ambiguous_model")
    return fitting[0], _companions(files, fitting[0], board)


def _names(files: list) -> str:
    return ", ".join(f.path for f in files[:20]) + (", ..." if len(files) > 20 else "")


def _socs_in(name: str) -> set:
    return {soc for soc in BOARDS if soc in name.lower()}


def _for_soc(models: list, soc: str) -> list:
    """Files naming this SoC; when no file names any SoC, all of them. Without a known
    SoC (not a Rockchip board) only files naming no other SoC than one agree."""
    named = [m for m in models if _socs_in(m.path)]
    if not named:
        return models
    if soc:
        return [m for m in models if soc in _socs_in(m.path)]
    socs = set().union(*(_socs_in(m.path) for m in named))
    return models if len(socs) == 1 else []


def _for_sdk(models: list, versions: tuple) -> list:
    """When the library's version is known and names carry SDK versions: the files of
    its major.minor (then the unversioned ones)."""
    wanted = {tuple(v.split(".")[:2]) for v in versions}
    if not wanted:
        return models
    same, unversioned = [], []
    for model in models:
        found = {m.groups()[:2] for m in _SDK_VERSION.finditer(os.path.basename(model.path))}
        (same if found & wanted else unversioned if not found else []).append(model)
    return same or unversioned


def _companions(files: list, model: HubFile, board: Board) -> list:
    folder = os.path.dirname(model.path)
    beside = [f for f in files if os.path.dirname(f.path) == folder and f is not model
              and _COMPANION.search(os.path.basename(f.path))]
    encoders = [f for f in beside if f.path.lower().endswith(".rknn")]
    if len(encoders) > 1:   # one vision encoder: the one for this SoC
        keep = _for_soc(encoders, board.soc)[:1]
        beside = [f for f in beside if f not in encoders or f in keep]
    return beside


def model_id_of(model: HubFile) -> str:
    return normalise_id(os.path.splitext(os.path.basename(model.path))[0])


def list_repo(api, repo: str, endpoint: str) -> list:
    """The repo's files with sizes and digests; PullError when it cannot be listed."""
    import httpx
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        entries = api.list_repo_tree(repo, recursive=True)
        return [HubFile(e.path, int(e.size or 0), e.lfs.sha256 if e.lfs else "", e.blob_id or "")
                for e in entries if hasattr(e, "blob_id")   # files only, not folders
                and _inside(e.path)]
    except GatedRepoError:
        raise PullError(f"{repo} is gated: accept its terms on the hub, then set HF_TOKEN",
                        status=403, code="repo_gated") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise PullError(f"repo {repo} not found on {endpoint}: check the name (owner/name); "
                        f"for a private repo set HF_TOKEN", status=404, code="repo_not_found") from None
    except HfHubHTTPError as exc:
        raise PullError(f"the hub at {endpoint} refused the listing of {repo}: {exc}",
                        status=502, code="hub_error") from None
    except (OSError, httpx.TransportError) as exc:
        raise PullError(f"cannot reach the hub at {endpoint} ({exc.__class__.__name__}): "
                        f"check the network, or HF_ENDPOINT for a mirror",
                        status=502, code="hub_unreachable") from None


def _inside(path) -> bool:
    """A listed path that stays inside the staging folder it is downloaded to. Git
    trees hold no such path, but a hostile HF_ENDPOINT could list "../../x.rkllm",
    which the download would write outside the models root."""
    return isinstance(path, str) and bool(path) and not path.startswith("/") \
        and "\\" not in path and all(part not in ("", ".", "..") for part in path.split("/"))


def file_digest_matches(path: str, item: HubFile) -> bool:
    if item.sha256:
        digest = hashlib.sha256()
    elif item.blob_id:
        digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    else:
        return True     # the hub published nothing to check against
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == (item.sha256 or item.blob_id)


class Puller:
    """Pulls one model at a time into models_root; board says which file fits."""

    def __init__(self, models_root: str, board: Board, endpoint: Optional[str] = None,
                 free_bytes: Callable[[str], int] = lambda path: shutil.disk_usage(path).free):
        self.models_root = models_root
        self.board = board
        self.endpoint = endpoint
        self.free_bytes = free_bytes
        self._pulling: set = set()    # model ids whose staging folder is being written
        self._lock = threading.Lock()

    def pull(self, spec: str, emit: Callable[[dict], None]) -> str:
        """Pulls and returns the model id; raises PullError."""
        from huggingface_hub import HfApi, constants
        repo, wanted = parse_spec(spec)
        endpoint = self.endpoint or constants.ENDPOINT
        emit({"status": "pulling manifest"})
        files = list_repo(HfApi(endpoint=endpoint), repo, endpoint)
        model, companions = choose_files(files, self.board, wanted)
        model_id = model_id_of(model)
        with self._lock:   # two specs naming one file must not share a staging folder
            if model_id in self._pulling:
                raise PullError(f"{model_id} is being pulled already (under another name): "
                                f"wait for that pull", status=409, code="pull_running")
            self._pulling.add(model_id)
        try:
            return self._pull_files(repo, endpoint, model, companions, model_id, emit)
        finally:
            with self._lock:
                self._pulling.discard(model_id)

    def _pull_files(self, repo, endpoint, model, companions, model_id, emit) -> str:
        target = os.path.join(self.models_root, model_id)
        if os.path.isdir(target):
            emit({"status": f"{model_id} is already in the models folder"})
            emit({"status": "success", "model": model_id})
            return model_id
        os.makedirs(self.models_root, exist_ok=True)
        staging = os.path.join(self.models_root, STAGING_PREFIX + model_id)
        wanted_files = [model] + companions
        self._check_space(wanted_files, staging)
        for item in wanted_files:
            self._download(repo, item, staging, endpoint, emit)
        emit({"status": "verifying sha256 digest"})
        for item in wanted_files:
            if not file_digest_matches(os.path.join(staging, item.path), item):
                shutil.rmtree(staging, ignore_errors=True)
                raise PullError(f"{item.path} does not match the checksum the hub publishes "
                                f"({item.digest}): the download was corrupted and was removed; "
                                f"pull again", status=502, code="checksum_mismatch")
        emit({"status": "writing manifest"})
        self._publish(staging, target, model)
        emit({"status": "success", "model": model_id})
        return model_id

    def _check_space(self, files: list, staging: str) -> None:
        needed = sum(f.size for f in files) - _bytes_under(staging) + DISK_MARGIN
        free = self.free_bytes(self.models_root)
        if needed > free:
            raise PullError(f"not enough disk space in {self.models_root}: the model needs "
                            f"{_size(needed)}, {_size(free)} is free; free some space or set "
                            f"RKLLM_MODELS_ROOT to a larger disk", status=507, code="disk_full")

    def _download(self, repo, item: HubFile, staging, endpoint, emit) -> None:
        """One file into staging, resumed from its `.partial` file when an earlier
        pull was cut (huggingface_hub's own download forgets a partial file)."""
        import httpx
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers
        final = os.path.join(staging, item.path)
        partial = final + ".partial"
        report = _ProgressReporter(item, emit)
        if os.path.exists(final):
            report.send(item.size, force=True)
            return
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.exists(partial) and os.path.getsize(partial) > item.size:
            os.remove(partial)   # longer than the file: not a part of it
        try:
            with open(partial, "ab") as fh:
                report.send(fh.tell(), force=True)
                http_get(hf_hub_url(repo, item.path, endpoint=endpoint), fh,
                         resume_size=fh.tell(), headers=build_hf_headers(),
                         expected_size=item.size, displayed_filename=item.path,
                         tqdm_class=report.bar_class())
        except HfHubHTTPError as exc:
            raise PullError(f"the hub refused {item.path}: {exc}", status=502,
                            code="hub_error") from None
        except (OSError, httpx.TransportError) as exc:   # huggingface_hub retried already
            if getattr(exc, "errno", None) == 28:   # ENOSPC while writing
                shutil.rmtree(staging, ignore_errors=True)
                raise PullError(f"the disk of {self.models_root} filled up during the pull: "
                                f"free some space and pull again", status=507,
                                code="disk_full") from None
            raise PullError(f"the download of {item.path} was cut ({exc.__class__.__name__}); "
                            f"pull again to resume it", status=502, code="download_cut") from None
        os.replace(partial, final)
        report.send(item.size, force=True)

    def _publish(self, staging: str, target: str, model: HubFile) -> None:
        folder = os.path.dirname(model.path)
        if folder:   # the model file sits in a sub-folder of the repo: lift that folder
            lifted = staging + ".lift"
            os.rename(os.path.join(staging, folder), lifted)
            shutil.rmtree(staging, ignore_errors=True)
            os.rename(lifted, staging)
        try:
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise PullError(f"{target} appeared during the pull; remove it and pull again",
                            status=409, code="model_exists") from None


class _ProgressReporter:
    """Turns huggingface_hub's progress-bar calls into rate-limited pull events."""

    def __init__(self, item: HubFile, emit):
        self.item, self.emit = item, emit
        self.completed = 0
        self.sent_at = float("-inf")

    def send(self, completed: int, force: bool = False) -> None:
        self.completed = completed
        now = time.monotonic()
        if force or now - self.sent_at >= PROGRESS_INTERVAL:
            self.sent_at = now
            self.emit({"status": f"pulling {self.item.path}", "digest": self.item.digest,
                       "total": self.item.size, "completed": min(completed, self.item.size)})

    def bar_class(self):
        reporter = self

        class Bar:   # the part of tqdm's interface huggingface_hub calls
            def __init__(self, *args, initial: int = 0, **kwargs):
                self.n = initial
                reporter.send(initial)

            def update(self, n: int = 1) -> None:
                self.n += n or 0
                reporter.send(self.n)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def close(self) -> None:
                pass

            def reset(self, total=None) -> None:
                self.n = 0

            def __getattr__(self, name):   # refresh, set_description, ...: nothing to show
                return lambda *a, **k: None

        return Bar


def _bytes_under(folder: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
