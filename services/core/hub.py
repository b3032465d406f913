"""Models and datasets named by Hugging Face Hub id (`Qwen/Qwen2.5-0.5B-Instruct`, `openai/gsm8k`), resolved
to a snapshot directory in the standard Hugging Face cache by huggingface_hub itself.

Guarantees:
- `looks_like_hub_id` is pure: `org/name` (or a bare `name`) that is not an existing path, not a `builtin:`
  name, and not a file name with a data or model suffix; anything else is a local path;
- `hub_snapshot` downloads what is missing into the cache (`HF_HOME`, `HF_HUB_CACHE`) or, with
  `HF_HUB_OFFLINE=1`, reads the cache only; it returns the snapshot of one commit, so every process given
  that directory reads the same files;
- a failure is one `HubError` naming the id, the revision, the cause, and the way out (`hf download ...`, the
  offline variables); never huggingface_hub's traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".yaml", ".yml", ".safetensors", ".bin")
"""A name ending with one of these is a file the user meant to give, not a repository."""

MODEL_IGNORE = ["*.onnx", "onnx/*", "*.gguf", "*.h5", "*.msgpack", "*.ot", "*.tflite", "original/*"]
"""Files of a model repository no process here reads (other runtimes' weights): not downloaded."""


class HubError(ValueError):
    """A Hub id could not be resolved; the message names the id, the cause and what to run."""


def looks_like_hub_id(spec: str) -> bool:
    """Whether `spec` names a Hub repository rather than a local path (see the module docstring)."""
    if not spec or spec.startswith(("builtin:", "/", ".", "~")) or Path(spec).exists():
        return False
    return bool(HUB_ID.match(spec)) and not spec.lower().endswith(LOCAL_SUFFIXES)


def offline() -> bool:
    """Whether huggingface_hub is told not to reach the network (`HF_HUB_OFFLINE`, as it read it)."""
    # lazy: heavy import (huggingface_hub), paid only when a Hub id is resolved
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_command(repo_id: str, repo_type: str, revision: str | None) -> str:
    """The `hf` command (huggingface_hub's CLI) that puts `repo_id` into the cache."""
    kind = " --repo-type dataset" if repo_type == "dataset" else ""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{kind}{rev}"


def hub_snapshot(repo_id: str, repo_type: str, revision: str | None, setting: str) -> Path:
    """The local snapshot directory of `repo_id` ("model" or "dataset") at `revision` (a branch, tag or
    commit; None: the default branch). `setting` names the config key in messages (`model.path`)."""
    # lazy: heavy import (huggingface_hub), paid only when a Hub id is resolved
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (  # lazy: as above
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{setting} {repo_id!r}" + (f" (revision {revision})" if revision else "")
    fetch = download_command(repo_id, repo_type, revision)
    try:
        path = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            ignore_patterns=MODEL_IGNORE if repo_type == "model" else None,
        )
    except GatedRepoError:
        raise HubError(
            f"{where}: a gated {repo_type} on the Hugging Face Hub: accept its terms on its page, log in "
            f"(`hf auth login` or HF_TOKEN), then `{fetch}`"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{where}: no such {repo_type} on the Hugging Face Hub (or it is private: log in with "
            f"`hf auth login` or HF_TOKEN); a local path must exist"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: the {repo_type} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        cache = constants.HF_HUB_CACHE
        if offline():
            cause = f"it is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids downloading"
            way = f"run `{fetch}` where the network is reachable (same HF_HOME), or unset HF_HUB_OFFLINE"
        else:
            cause = f"it is not in the Hugging Face cache ({cache}) and the Hub cannot be reached"
            way = f"run `{fetch}` where the network is reachable and point HF_HOME at that cache, then set HF_HUB_OFFLINE=1"
        raise HubError(f"{where}: {cause}; {way}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(
            f"{where}: download failed ({type(exc).__name__}: {exc}); retry, or `{fetch}`"
        ) from None
    return Path(path)
