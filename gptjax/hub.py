"""Models from the Hugging Face Hub by id (`gpt2`, `openai-community/gpt2-medium`, `org/name@REVISION`).

The files come through huggingface_hub, so its cache, `HF_TOKEN`, `HF_HUB_OFFLINE`, revisions and progress
bars work as they do everywhere else. A model is converted once per commit, into
`$GPTJAX_CACHE_DIR/models/<id>@<commit>/`: a checkpoint folder plus the repo's tokenizer files and
`source.json` (id, revision asked for, commit). It is built in a temporary sibling and renamed, so a folder
there is always whole; later runs load it without reading the Hub's weights again, offline too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from gptjax.paths import cache_dir
from gptjax.tokenizer import FOLDER_FILES

log = logging.getLogger("gptjax.hub")

SOURCE_FILE = "source.json"
DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(ValueError):
    """A Hub model that can't be resolved, fetched or converted; the message says which, and how to fix it."""


class ModelNotFound(HubError):
    """Neither on the Hub nor in its cache (or not reachable): the command line then lists the presets too."""


@dataclasses.dataclass(frozen=True)
class ConvertedModel:
    """A model converted into the cache, as its source.json tells."""

    model_id: str
    revision: str
    commit: str
    path: Path

    @property
    def name(self) -> str:
        """How `gptjax models` shows it and `--model` / `--rm` take it back."""
        return f"{self.model_id}@{self.commit[:12]}"

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def models_dir() -> Path:
    return cache_dir() / "models"


def converted_folder(model_id: str, commit: str) -> Path:
    return models_dir() / f"{model_id}@{commit}"


def parse_model_id(model_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """`org/name@REV` -> ("org/name", "REV"), the id checked to be a Hub repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, at, rev = model_id.partition("@")
    if at:
        if not rev:
            raise HubError(f"{model_id!r}: nothing after '@' (expected ID@REVISION)")
        if revision is not None and revision != rev:
            raise HubError(f"{model_id!r} names revision {rev!r}, but revision {revision!r} was given too")
        revision = rev
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ModelNotFound(f"{repo!r} is not a Hugging Face Hub id (NAME or ORG/NAME: letters, digits, "
                            "'-', '_', '.')") from None
    return repo, revision


def pretrained_folder(model_id: str, revision: str | None = None, *, isolate: bool = False) -> Path:
    """The converted checkpoint folder of a Hub model of GPT-2 architecture, fetched and converted the first
    time. `isolate` converts in a child process, leaving this process's JAX untouched (the command line needs
    that: jax.distributed must start before anything uses a JAX backend)."""
    from checkpoints.hf_gpt2 import read_config

    repo, revision = parse_model_id(model_id, revision)
    config_file = _hub_file(repo, "config.json", revision)
    if config_file is None:  # the Hub can't be reached and its cache lacks the repo
        return _converted_offline(repo, revision)
    commit = config_file.parent.name
    folder = converted_folder(repo, commit)
    if _is_converted(folder):
        return folder
    label = f"{repo}@{commit[:12]}"
    read_config(config_file.parent, label)  # refuse another architecture before fetching its weights
    with _lock(folder):
        if _is_converted(folder):  # another process converted it meanwhile
            return folder
        snapshot = _fetch_weights(repo, commit, label)
        if not all(_hub_file(repo, name, commit, required=False) for name in FOLDER_FILES):
            _hub_file(repo, "tokenizer.json", commit, required=False)  # what transformers 5 saves alone
        source = {"model_id": repo, "revision": revision or DEFAULT_REVISION, "commit": commit}
        _convert(snapshot, folder, source, label, isolate)
    log.info("converted %s into %s", label, folder)
    return folder


def _is_converted(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()  # written last, inside the folder that is renamed into place


def _hub_file(repo: str, filename: str, revision: str | None, required: bool = True) -> Path | None:
    """One file of the repo through the Hub's cache; None when it is not there (not in the repo, or, offline,
    not in the cache): for a required file only when the Hub can't be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError:
        return None
    except GatedRepoError:
        raise HubError(f"{repo} is gated on the Hugging Face Hub: accept its terms there, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{repo} is not a model on the Hugging Face Hub (a private one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"{repo} has no revision {revision!r} on the Hugging Face Hub") from None
    except EntryNotFoundError:
        if required:
            raise HubError(f"{repo} has no {filename} on the Hugging Face Hub: not a transformers model") from None
        return None
    except OSError as e:  # the Hub answered with an error, or the cache can't be written
        first = str(e).splitlines()[0] if str(e) else "no details"
        raise HubError(f"{repo}: fetching {filename} failed ({type(e).__name__}: {first})") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _converted_offline(repo: str, revision: str | None) -> Path:
    """Without the Hub: the conversion of that commit (or of a commit prefix of 7 or more characters, as `gptjax
    models` shows it), or the newest one of that branch or tag."""
    wanted = revision or DEFAULT_REVISION
    found = [m for m in converted_models() if m.model_id == repo and
             (wanted in (m.revision, m.commit) or (len(wanted) >= 7 and m.commit.startswith(wanted)))]
    if found:
        return max(found, key=lambda m: m.path.stat().st_mtime).path
    where = f"{repo}@{revision}" if revision else repo
    if _offline():
        raise ModelNotFound(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: run once "
                            "without HF_HUB_OFFLINE to download it")
    raise ModelNotFound(f"{where} is not in the Hugging Face cache and the Hub can't be reached: check the "
                        "network (or HF_ENDPOINT)")


def _fetch_weights(repo: str, commit: str, label: str) -> Path:
    """The weights of one commit (one file, or the shards an index names); returns its snapshot folder."""
    from checkpoints.hf_gpt2 import WEIGHT_FILES, shard_names

    for name in WEIGHT_FILES:
        path = _hub_file(repo, name, commit, required=False)
        if path is None:
            continue
        if name.endswith(".index.json"):
            for shard in shard_names(path):
                if _hub_file(repo, shard, commit, required=False) is None:
                    raise HubError(f"{label}: {shard}, named in {name}, is missing" + _offline_hint())
        return path.parent
    raise HubError(f"{label}: none of {', '.join(WEIGHT_FILES)} is there" + _offline_hint())


def _offline_hint() -> str:
    return " (not in the Hugging Face cache, and HF_HUB_OFFLINE is set)" if _offline() else ""


def _convert(snapshot: Path, folder: Path, source: dict, label: str, isolate: bool) -> None:
    """Convert (the repo's tokenizer files come with the weights) into a temporary sibling of `folder`, add
    source.json, rename."""
    from gptjax.checkpoint import CheckpointError, UnsupportedCheckpoint
    from checkpoints.hf_gpt2 import convert_hf_gpt2

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        staged = tmp / "checkpoint"
        try:
            (_convert_in_child if isolate else convert_hf_gpt2)(snapshot, staged)
        except CheckpointError as e:  # UnsupportedCheckpoint: a whole download of another kind of model
            damaged = "" if isinstance(e, UnsupportedCheckpoint) else (" (a damaged download: delete it from the "
                                                                      "Hugging Face cache and run again)")
            raise HubError(f"{label}: {e}{damaged}") from None
        (staged / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if folder.is_dir() and not _is_converted(folder):  # a leftover of a conversion or removal cut short
            shutil.rmtree(folder)
        try:
            staged.rename(folder)
        except OSError:  # a process without our lock (another host) renamed its copy first
            if not _is_converted(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_in_child(src: Path, dst: Path) -> None:
    """The conversion in a fresh process on the CPU (`_child_convert`); its error raised here, of its own kind (an
    UnsupportedCheckpoint is no damaged download)."""
    from gptjax.checkpoint import CheckpointError, UnsupportedCheckpoint

    code = "import sys; from gptjax.hub import _child_convert; _child_convert(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"the conversion exited with status {proc.returncode}"
        kind, _, message = last.partition(": ")
        kinds = {e.__name__: e for e in (CheckpointError, UnsupportedCheckpoint)}
        raise kinds[kind](message) if kind in kinds else CheckpointError(last)


def _child_convert(src: str, dst: str) -> None:
    """The child's side of `_convert_in_child`: a CheckpointError's kind and message as its last line, exit 2."""
    from checkpoints.hf_gpt2 import convert_hf_gpt2
    from gptjax.checkpoint import CheckpointError

    try:
        convert_hf_gpt2(src, dst)
    except CheckpointError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def _lock(folder: Path):
    """One conversion of a folder at a time on this machine (every process of a job asks for it)."""
    from filelock import FileLock

    locks = models_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / (folder.relative_to(models_dir()).as_posix().replace("/", "--") + ".lock"))):
        yield


def converted_models() -> list[ConvertedModel]:
    """Every model converted into the cache, by name."""
    root = models_dir()
    found = []
    for source in [*root.glob(f"*@*/{SOURCE_FILE}"), *root.glob(f"*/*@*/{SOURCE_FILE}")]:
        if any(part.startswith(".") for part in source.relative_to(root).parts):
            continue  # a conversion under way, or the locks
        try:
            data = json.loads(source.read_text())
            found.append(ConvertedModel(str(data["model_id"]), str(data["revision"]), str(data["commit"]),
                                        source.parent))
        except (OSError, KeyError, TypeError, ValueError, RecursionError):  # ValueError: not JSON, or not UTF-8
            continue  # not ours: leave it alone
    return sorted(found, key=lambda m: m.name)


def remove_converted(spec: str) -> list[ConvertedModel]:
    """Delete the conversions of `ID` (every revision) or `ID@REV` (a branch, tag, or commit prefix of 7 or more
    characters, as `--model` takes)."""
    repo, at, rev = spec.partition("@")
    matches = [m for m in converted_models()
               if m.model_id == repo and (not at or (rev and (m.revision == rev or (len(rev) >= 7 and
                                                                                    m.commit.startswith(rev)))))]
    if not matches:
        raise HubError(f"no converted model {spec} in {models_dir()} (`gptjax models` lists them)")
    for m in matches:
        (m.path / SOURCE_FILE).unlink()  # first: a removal cut short leaves a folder that counts as a leftover
        shutil.rmtree(m.path)
        if m.path.parent != models_dir() and not any(m.path.parent.iterdir()):
            m.path.parent.rmdir()  # the org's folder, now empty
    return matches
