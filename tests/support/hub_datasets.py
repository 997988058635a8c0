"""Hugging Face datasets without the Hub: repository folders and a genuine offline cache.

``write_repository`` lays out a folder the way ``huggingface-cli download
--repo-type dataset`` leaves one: ``README.md`` (YAML ``configs:`` when there
are several) and ``data/<split>-0000i-of-0000n.<ext>`` shards.

``cache_hub_dataset`` leaves the ``datasets`` cache exactly as loading
``org/name`` from the Hub once (at commit ``commit``) leaves it, so that
``load_dataset("org/name")`` under ``HF_HUB_OFFLINE=1`` finds it: the data is
prepared by ``datasets``' own builder from such a folder, and the result put
where a Hub load puts it, ``<cache>/<org>___<name>/<config>/<version>/<commit>``
(the commit takes the place of the local folder's hash; nothing inside the
prepared files names either).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional

import datasets

Rows = List[dict]


def write_repository(path: str, splits: Dict[str, Rows], fmt: str = "parquet",
                     shards: int = 1, configs: Optional[Dict[str, Dict[str, Rows]]] = None) -> str:
    """``splits`` as ``data/`` shards; or, with ``configs``, one folder per config."""
    os.makedirs(path, exist_ok=True)
    card = "---\nlicense: mit\n"
    if configs:
        card += "configs:\n"
        for name, config_splits in configs.items():
            card += f"- config_name: {name}\n  data_files:\n"
            for split in config_splits:
                card += f"  - split: {split}\n    path: data/{name}/{split}-*.{fmt}\n"
            _write_splits(os.path.join(path, "data", name), config_splits, fmt, shards)
    else:
        _write_splits(os.path.join(path, "data"), splits, fmt, shards)
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as fp:
        fp.write(card + "---\n\n# A test dataset\n")
    return path


def _write_splits(folder: str, splits: Dict[str, Rows], fmt: str, shards: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for split, rows in splits.items():
        per = -(-len(rows) // shards)
        for i in range(shards):
            part = rows[i * per:(i + 1) * per]
            out = os.path.join(folder, f"{split}-{i:05d}-of-{shards:05d}.{fmt}")
            if fmt == "jsonl":
                with open(out, "w", encoding="utf-8") as fp:
                    fp.writelines(json.dumps(r) + "\n" for r in part)
            else:
                datasets.Dataset.from_list(part).to_parquet(out)


def cache_hub_dataset(cache_dir: str, repo_id: str, repository: str, commit: str,
                      config: Optional[str] = None) -> str:
    """Prepare ``repository`` into ``cache_dir`` as the Hub dataset ``repo_id`` at ``commit``."""
    namespace, name = repo_id.split("/")
    with tempfile.TemporaryDirectory() as scratch:
        # the builder names its files after the folder: give it the dataset's name
        folder = os.path.join(scratch, name)
        shutil.copytree(repository, folder)
        builder = datasets.load_dataset_builder(folder, name=config,
                                                cache_dir=os.path.join(scratch, "cache"))
        builder.download_and_prepare()
        prepared = builder.cache_dir  # <scratch>/cache/<name>/<config>/<version>/<hash>
        config_id, version = prepared.split(os.sep)[-3:-1]
        target = os.path.join(cache_dir, f"{namespace}___{name}", config_id, version, commit)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(prepared, target)
    return target


def qa_rows(n: int, prefix: str = "q") -> Rows:
    """Rows with the text spread over two fields, in the pico tokenizer's alphabet."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [{"question": f"{prefix} {letters[i % 26] * (3 + i % 5)}",
             "answer": f"{letters[(7 * i) % 26]}{i}"} for i in range(n)]
