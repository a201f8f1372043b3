"""The Hub, intercepted for the real `Trainer.push_to_hub` (no network): what each upload would have sent."""
from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import HfApi
from huggingface_hub.errors import OfflineModeIsEnabled


def intercept_hub(monkeypatch, folder: Path) -> list[Path]:
    """Patch `HfApi` for one test: ``create_repo`` answers ``someone/<name>``, ``model_info`` (the Trainer's
    licence lookup for ``finetuned_from``) says offline, and every ``upload_folder`` copies the folder, as
    its ``ignore_patterns`` leave it, into ``folder``/<n>. Returns those copies, in upload order (checkpoint
    pushes run as futures: the copy is what the folder held when the upload started)."""
    uploads: list[Path] = []

    def upload_folder(self, folder_path, run_as_future: bool = False, ignore_patterns=(), **kwargs):
        copy = folder / str(len(uploads))
        shutil.copytree(folder_path, copy, ignore=shutil.ignore_patterns(*(ignore_patterns or ())))
        uploads.append(copy)
        if not run_as_future:
            return "commit-url"
        done = Future()
        done.set_result("commit-url")
        return done

    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled("the tests run offline")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(
        repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "model_info", offline)
    return uploads
