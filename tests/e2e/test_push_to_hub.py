"""`mergekit-com ... --push-to-hub org/name [--private]`, Hub calls recorded (there is no Hub)."""

import os

import huggingface_hub
import pytest
import yaml
from huggingface_hub import RepoUrl
from huggingface_hub.utils import filter_repo_objects

from mergekit_com import cli
from mergekit_com.io import hub_upload
from tests.support.merging import com_config, count_merged_layers, experts

REPO_ID = "pico-org/merged"


class RecordingHfApi:
    """HfApi's two calls used by the upload, recorded; the folder is listed when uploaded."""

    calls: list = []
    fail_upload = False

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None,
                      allow_patterns=None):
        if self.fail_upload:
            raise RuntimeError("403 Forbidden: no write access\nmore detail")
        # what huggingface_hub itself would select from the folder with these patterns
        files = sorted(filter_repo_objects(os.listdir(folder_path), allow_patterns=allow_patterns))
        self.calls.append(("upload_folder", repo_id, str(folder_path), repo_type, files))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Online as far as huggingface_hub can tell, a token in the environment, HfApi recorded."""
    RecordingHfApi.calls = []
    RecordingHfApi.fail_upload = False
    monkeypatch.setattr(hub_upload, "HfApi", RecordingHfApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_recorded_not_real")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return RecordingHfApi


@pytest.fixture
def config(zoo2, tmp_path):
    path = tmp_path / "com.yml"
    path.write_text(yaml.safe_dump(com_config(experts(zoo2))))
    return str(path)


def run(*args) -> int:
    try:
        cli.main([*args, "--quiet"])
        return 0
    except SystemExit as e:
        return e.code


def test_merge_then_upload_of_the_published_folder(hub, config, tmp_path, capsys):
    out = str(tmp_path / "out")
    os.makedirs(out)
    (tmp_path / "out" / "my_notes.txt").write_text("private")  # the user's, not the merge's
    assert run(config, out, "--push-to-hub", REPO_ID, "--private") == 0
    create, upload = hub.calls
    assert create == ("create_repo", REPO_ID, "model", True, True)
    name, repo_id, folder, repo_type, files = upload
    assert (name, repo_id, folder, repo_type) == ("upload_folder", REPO_ID, out, "model")
    # uploaded once published: the whole model, nothing of the work directory
    assert {"model.safetensors", "config.json", "README.md", "com_report.json"} <= set(files)
    assert "my_notes.txt" not in files and ".mergekit-com.json" not in files
    assert not os.path.exists(out + ".com-work")
    assert f"uploaded {out} to https://huggingface.co/{REPO_ID}" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("no token", "--push-to-hub needs a Hugging Face token with write access: run "
                 "`hf auth login` or set HF_TOKEN"),
    ("offline", "--push-to-hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; unset "
                "it, or upload the merged folder later with `hf upload`"),
    ("bad id", "--push-to-hub 'pico-org/a/b' is not a Hub repository id"),
    ("private alone", "--private applies to --push-to-hub; add --push-to-hub org/name"),
])
def test_refused_before_any_work(hub, config, tmp_path, monkeypatch, capsys, case, message):
    merged = count_merged_layers(monkeypatch)
    repo = "pico-org/a/b" if case == "bad id" else REPO_ID
    args = ["--private"] if case == "private alone" else ["--push-to-hub", repo]
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        assert huggingface_hub.get_token() is None
    if case == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert run(config, out, *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mergekit-com: error: {message}"), lines
    assert merged == [] and hub.calls == []
    assert not os.path.exists(out) and not os.path.exists(out + ".com-work")


def test_failed_upload_keeps_the_merge_and_says_how_to_retry(hub, config, tmp_path, capsys):
    hub.fail_upload = True
    out = str(tmp_path / "out")
    assert run(config, out, "--push-to-hub", REPO_ID) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"mergekit-com: error: the merged model is in {out}, but uploading it to "
                     f"{REPO_ID} failed (403 Forbidden: no write access); upload it with "
                     f"`hf upload {REPO_ID} {out}`"]
    assert "model.safetensors" in os.listdir(out)
