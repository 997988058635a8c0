"""``mergekit-com ... --push-to-hub org/name [--private]``: publish the merged folder.

``check_push`` runs before any work, so that a merge is never done for an upload that
cannot happen; ``push`` creates the model repository (or reuses it) and uploads the
published output folder with huggingface_hub.
"""

from __future__ import annotations

import glob

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from mergekit_com.errors import MergeInputError, first_line
from mergekit_com.io.publish import published_files


class HubUploadError(MergeInputError):
    """The merge is done, but its upload failed."""

    exit_code = 1


def check_push(repo_id: str) -> None:
    """A valid repository id, the Hub reachable in principle, and a token to write with."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise MergeInputError(
            f"--push-to-hub {repo_id!r} is not a Hub repository id ({e}); give org/name"
        ) from None
    if huggingface_hub.is_offline_mode():
        raise MergeInputError(
            "--push-to-hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset it, "
            "or upload the merged folder later with `hf upload`")
    if huggingface_hub.get_token() is None:
        raise MergeInputError(
            "--push-to-hub needs a Hugging Face token with write access: run `hf auth login` "
            "or set HF_TOKEN")


def push(folder: str, repo_id: str, private: bool) -> str:
    """Create (or reuse) the model repository and upload the merge in ``folder``; its URL.

    Only the files the merge published go up: never anything else the user keeps in
    ``out_path``, nor this package's bookkeeping there.
    """
    names = published_files(folder)
    if not names:
        raise HubUploadError(f"{folder} holds no merge published by mergekit-com to upload")
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=folder, repo_type="model",
                          allow_patterns=[glob.escape(n) for n in names],
                          commit_message="Upload a Chain of Merges merge (mergekit-com)")
    except Exception as e:
        raise HubUploadError(
            f"the merged model is in {folder}, but uploading it to {repo_id} failed ({first_line(e)}); "
            f"upload it with `hf upload {repo_id} {folder}`") from None
    return str(repo)
