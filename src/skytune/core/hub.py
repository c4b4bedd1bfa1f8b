"""The Hugging Face hub: whether this process is offline, and the commit a model id's revision points at."""

from __future__ import annotations

import os
from pathlib import Path

from skytune.core.errors import SkytuneError


def offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the local cache only (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(repo_id: str, revision: str | None) -> str:
    """The commit hash `revision` (a branch, tag or commit; None = main) of a hub model points at.

    Online it asks the hub; with HF_HUB_OFFLINE=1 it reads the local cache. Gated models need HF_TOKEN.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        HTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    try:
        if offline():
            folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
            return Path(folder).name
        return HfApi().model_info(repo_id, revision=revision).sha
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise SkytuneError(
            f"params.yaml model.base: {repo_id!r} (revision {revision!r}) is not in the local Hugging Face cache "
            "and this machine is offline (HF_HUB_OFFLINE=1). Download it once online (`hf download "
            f"{repo_id}`), point model.base at a local directory or .gguf file, or unset HF_HUB_OFFLINE."
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        raise SkytuneError(
            f"params.yaml model.base: {repo_id!r} (revision {revision!r}) could not be resolved on the hub "
            f"(HTTP {status}). Check the id and revision; for a gated model set HF_TOKEN to a token with access."
        ) from exc
    except HFValidationError as exc:
        raise SkytuneError(f"params.yaml model.base: {repo_id!r} is neither a built-in name, a .gguf file, a local "
                           f"directory nor a valid hub id ({exc})") from exc
    except (HTTPError, OSError) as exc:  # no route to the hub (httpx's transport errors)
        raise SkytuneError(
            f"params.yaml model.base: {repo_id!r} could not be reached on the hub ({type(exc).__name__}: {exc}). "
            "Check the network, or set HF_HUB_OFFLINE=1 to use the local cache."
        ) from exc
