"""The bad inputs of docs/errors.md's "What happens when..." table, built on pico models.

Every case runs from one directory (``World.root``) holding the models and
data under short relative names, so that its message is the same on every
machine: docs/errors.md shows exactly that message, and the tests compare them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.support import pico
from tests.support.hub_datasets import qa_rows, write_repository
from tests.support.merging import com_config
from tests.support.paths import DOCS

ERRORS_DOC = os.path.join(DOCS, "errors.md")
ROW = re.compile(r"^\| (\w+) \| [^|]+ \| (stops|merges)[^|]* \| (.+) \|$", re.M)


SLICED = """slices:
  - sources:
      - model: ./expert0
        layer_range: [0, {end}]
        parameters: {{calibration: e0.jsonl}}
      - model: ./expert1
        layer_range: [0, {end}]
        parameters: {{calibration: e1.jsonl}}
"""

TWO_MODELS = """models:
  - model: ./expert0
    parameters: {calibration: e0.jsonl}
  - model: ./expert1
    parameters: {calibration: e1.jsonl}
"""


@dataclass
class Case:
    id: str
    expert: str = "expert1"  # the second model; the first is always expert0 on e0.jsonl
    calibration: Optional[str] = "e1.jsonl"
    first_calibration: Optional[str] = "e0.jsonl"  # of ./expert0; None: no ./expert0
    params: Dict = field(default_factory=dict)
    model_params: Dict = field(default_factory=dict)  # more of the second model's parameters
    weight: Optional[float] = None
    first_weight: Optional[float] = None
    out: Optional[str] = None
    raw_config: Optional[str] = None  # a config file text instead of a built config
    method: str = "chain_of_merges"
    args: Tuple[str, ...] = ()  # more command-line flags
    out_holds: Tuple[str, ...] = ()  # files in out_path before the merge (World.prepare_out)
    mount: Optional[str] = None  # run in a mount namespace, this mounted (World.mounts)
    code: int = 2  # the exit code of a case that stops

    @property
    def out_path(self) -> str:
        return self.out or f"out-{self.id}"


CASES = {c.id: c for c in [
    Case("1", calibration="missing.jsonl"),
    Case("2", calibration="empty.jsonl"),
    Case("3", calibration="notext.jsonl"),
    Case("4", calibration="broken.jsonl"),
    Case("5", calibration="notds"),
    Case("6", expert="expert_notok"),
    Case("7", calibration=None),
    Case("8", params={"num_samples": 50}),
    Case("9", params={"alpah": 0.9}),
    Case("10a", params={"alpha": 1.5}),
    Case("10b", params={"num_samples": 0}),
    Case("10c", params={"max_seq_len": -1}),
    Case("10d", weight=-1.0),
    Case("10e", params={"chain": "forward"}),
    Case("10f", params={"objective": "mse"}),
    Case("10g", params={"fallback": "median"}),
    Case("11a", expert="expert_mistral"),
    Case("11b", expert="expert_wide"),
    Case("12", expert="expert_vocab"),
    Case("13", expert="expert_nan"),
    Case("14", calibration="tiny.jsonl", params={"ridge": 0.0, "alpha": 1.0}),
    Case("15", out="merged", out_holds=("notes.txt", "config.json")),
    Case("15b", out="merged-15b", out_holds=("notes.txt",)),
    Case("16", expert="expert_remote"),
    Case("17", expert="expert_evil"),
    Case("m1", expert="missing_model"),
    Case("m2", expert="expert_noweights"),
    Case("d1", calibration="qa_repo",
         model_params={"calibration_split": "validation", "calibration_column": "question"}),
    Case("d2", calibration="qa_repo",
         model_params={"calibration_config": "fr", "calibration_column": "question"}),
    Case("d3", calibration="qa_repo", model_params={"calibration_column": "answr"}),
    Case("d4", calibration="qa_repo", model_params={"calibration_template": "{question} {answr}"}),
    Case("d5", calibration="qa_repo",
         model_params={"calibration_column": "question", "calibration_template": "{answer}"}),
    Case("d6", calibration="pico-org/absent"),
    Case("o1", out="expert1"),
    Case("o2", out="expert1/merged"),
    Case("o3", out="."),
    Case("o4", expert="expert_link", out="out-o4", out_holds=("model.safetensors",)),
    Case("i1", calibration="fifo.jsonl"),
    Case("i2", expert="expert_fifo"),
    Case("v1", expert="expert0", calibration="e0.jsonl"),
    Case("v2", weight=0.0, first_weight=0.0),
    Case("v3", weight=1e308),
    Case("v4", method="chain_of_merge"),
    Case("v5", args=("--device", "meta")),
    Case("v6", params={"max_seq_len": 1024}),
    Case("w1"),
    Case("w2", out="ro/merged", mount="ro"),
    Case("w3", out="full/merged", mount="full"),
    Case("w4", out="small/merged", mount="small", params={"num_samples": 12}),
    Case("w5", out="mnt", mount="mnt", params={"num_samples": 12}),
    Case("w6", out="fsize/merged", mount="fsize", params={"num_samples": 12}),
    Case("s1", code=143),
    Case("c1", raw_config="merge_method: chain_of_merges\nmodels: [\n"),
    Case("c2", raw_config="merge_method: chain_of_merges\nmodels:\n  - parameters: {}\n"),
    Case("c3", raw_config=f"merge_method: chain_of_merges\n{TWO_MODELS}paramters: {{alpha: 0.5}}\n"),
    Case("c4", raw_config="merge_method: chain_of_merges\nmodels: []\n"),
    Case("c5", raw_config=f"merge_method: chain_of_merges\n{TWO_MODELS}dtype: bf16\n"),
    Case("c6", raw_config=f"merge_method: chain_of_merges\n{TWO_MODELS}chat_template: chatm\n"),
    Case("c7", raw_config=f"merge_method: chain_of_merges\n{TWO_MODELS}tokenizer_source: ./tok\n"),
    Case("c8", raw_config=f"merge_method: chain_of_merges\n{TWO_MODELS}tokenizer:\n  source: union\n"
                          "  tokens:\n    <x>: {source: ./expert0}\n"),
    Case("10h", params={"ridge": 1e5}),
    Case("11c", expert="expert_deep"),
    Case("11d", expert="expert_noarch"),
    Case("m3", expert="e0.jsonl"),
    Case("v7", expert="expert0/", calibration="e0.jsonl"),
    Case("v8", params={"lambda": 1e5}),
    Case("v9", args=("--out-shard-size", "-1")),
    Case("l1", raw_config="merge_method: chain_of_merges\n" + SLICED.format(end=3)),
    Case("l2", raw_config="merge_method: chain_of_merges\nbase_model: ./expert0\nslices:\n"
                          "  - sources:\n      - model: ./expert1\n        layer_range: [0, 2]\n"
                          "        parameters: {calibration: e1.jsonl}\n"),
    Case("t1", expert="expert_tool", calibration="tool.jsonl", first_calibration=None),
    Case("t2", expert="expert_notokfiles"),
    Case("o5", out="e0.jsonl/merged"),
]}


def documented_rows() -> Dict[str, tuple]:
    """Case id -> (outcome, message) from the table in docs/errors.md."""
    text = open(ERRORS_DOC, encoding="utf-8").read()
    return {cid: (outcome, message) for cid, outcome, message in ROW.findall(text)}


class Evil:
    """Unpickling this creates the file at ``path``: code execution, made visible."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class World:
    """A directory of models and data for the cases (built lazily, once)."""

    def __init__(self, root: str, zoo: Dict[str, str]):
        self.root = root
        self.zoo = zoo
        self.marker = os.path.join(root, "CODE_WAS_RUN")
        for i in range(2):
            os.symlink(zoo[f"expert{i}"], os.path.join(root, f"expert{i}"))
            shutil.copy(zoo[f"expert{i}_data"], os.path.join(root, f"e{i}.jsonl"))

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    # ------------------------------------------------------------ inputs
    def ensure(self, name: Optional[str]) -> None:
        if (name is None or name.startswith(("missing", "pico-org/"))
                or os.path.lexists(self.path(name))):
            return
        getattr(self, "_make_" + re.sub(r"\W", "_", name))(self.path(name))

    def _make_empty_jsonl(self, p):
        open(p, "w").close()

    def _make_notext_jsonl(self, p):
        with open(p, "w") as fp:
            fp.write('{"text": "abc"}\n{"prompt": "no text"}\n')

    def _make_broken_jsonl(self, p):
        with open(p, "w") as fp:
            fp.write('{"text": "abc"}\n\n{"text": "abc"\n')

    def _make_tiny_jsonl(self, p):
        pico.write_jsonl(p, ["ab"])

    def _make_qa_repo(self, p):
        write_repository(p, {"train": qa_rows(12), "test": qa_rows(3, "t")})

    def _make_notds(self, p):
        os.makedirs(p)
        with open(os.path.join(p, "notes.txt"), "w") as fp:
            fp.write("not a dataset\n")

    def _copy_expert1(self, p):
        shutil.copytree(self.zoo["expert1"], p)

    def _make_expert_notok(self, p):
        # Same vocabulary, but the normalizer drops every character and no
        # BOS is added: every text becomes zero tokens.
        from tokenizers import Regex, normalizers

        self._copy_expert1(p)
        tok = pico.make_tokenizer()
        tok.backend_tokenizer.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")
        tok.backend_tokenizer.post_processor = None
        tok.save_pretrained(p)

    def _make_expert_tool(self, p):  # its tokenizer has a token its embeddings lack
        self._copy_expert1(p)
        tok = pico.make_tokenizer()
        tok.add_tokens(["<tool>"])
        tok.save_pretrained(p)

    def _make_tool_jsonl(self, p):
        pico.write_jsonl(p, ["call <tool> now", "and again"])

    def _make_expert_notokfiles(self, p):
        self._copy_expert1(p)
        for name in os.listdir(p):
            if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                os.remove(os.path.join(p, name))

    def _make_expert_mistral(self, p):
        config = pico.llama_config(layers=2, arch="mistral")
        pico.save_model(p, config, pico.random_state(config, seed=0))

    def _make_expert_wide(self, p):
        config = pico.llama_config(layers=2, intermediate_size=96)
        pico.save_model(p, config, pico.random_state(config, seed=0))

    def _make_expert_vocab(self, p):
        tok = pico.make_tokenizer()
        tok.add_tokens(["<extra>"])
        config = pico.llama_config(layers=2, vocab_size=pico.VOCAB + 1)
        pico.save_model(p, config, pico.random_state(config, seed=0), tokenizer=tok)

    def _make_expert_nan(self, p):
        self._copy_expert1(p)
        f = os.path.join(p, "model.safetensors")
        state = load_file(f)
        w = state["model.layers.1.mlp.up_proj.weight"]
        w[0, 0], w[0, 1] = float("nan"), float("inf")
        save_file(state, f, metadata={"format": "pt"})

    def _make_expert_deep(self, p):  # its config says one layer more than its weights hold
        self._copy_expert1(p)
        f = os.path.join(p, "config.json")
        config = json.load(open(f))
        config["num_hidden_layers"] += 1
        with open(f, "w") as fp:
            json.dump(config, fp)

    def _make_expert_noarch(self, p):  # its config.json lost "architectures"
        self._copy_expert1(p)
        f = os.path.join(p, "config.json")
        config = json.load(open(f))
        del config["architectures"]
        with open(f, "w") as fp:
            json.dump(config, fp)

    def _make_expert_noweights(self, p):
        os.makedirs(p)
        shutil.copy(os.path.join(self.zoo["expert1"], "config.json"), p)

    def _make_expert_remote(self, p):
        os.makedirs(p)
        with open(os.path.join(p, "config.json"), "w") as fp:
            json.dump({"model_type": "pico_custom", "architectures": ["PicoForCausalLM"],
                       "auto_map": {"AutoConfig": "configuration_pico.PicoConfig"}}, fp)
        with open(os.path.join(p, "configuration_pico.py"), "w") as fp:
            fp.write(f"open({self.marker!r}, 'w').close()\n"
                     "from transformers import PretrainedConfig\n"
                     "class PicoConfig(PretrainedConfig):\n    model_type = 'pico_custom'\n")

    def _pickled_expert(self, p, extra):
        self._copy_expert1(p)
        f = os.path.join(p, "model.safetensors")
        state = load_file(f)
        os.remove(f)
        torch.save({**state, **extra}, os.path.join(p, "pytorch_model.bin"))

    def _make_expert_evil(self, p):
        self._pickled_expert(p, {"payload": Evil(self.marker)})

    def _make_expert_bin(self, p):
        self._pickled_expert(p, {})

    # ------------------------------------------------------------ configs
    def config_file(self, case: Case) -> str:
        path = self.path(f"case-{case.id}.yml")
        if case.raw_config is not None:
            text = case.raw_config
        else:
            self.ensure(case.expert)
            self.ensure(case.calibration)
            self.ensure(case.first_calibration)
            # "./": mergekit's model card asks the hub about bare names like "expert1"
            second = {"model": f"./{case.expert}"}
            if case.calibration:
                second["calibration"] = case.calibration
            if case.weight is not None:
                second["weight"] = case.weight
            second.update(case.model_params)
            first = {"model": "./expert0", "calibration": case.first_calibration}
            if case.first_weight is not None:
                first["weight"] = case.first_weight
            cfg = com_config(([first] if case.first_calibration else []) + [second], **case.params)
            cfg["merge_method"] = case.method
            text = yaml.safe_dump(cfg, sort_keys=False)
        with open(path, "w") as fp:
            fp.write(text)
        return path

    def prepare_out(self, case: Case) -> Dict[str, bytes]:
        """The files ``case.out_holds`` in out_path before the merge; returns them."""
        out = self.path(case.out_path)
        before = {}
        for name in case.out_holds:
            os.makedirs(out, exist_ok=True)
            data = open(os.path.join(self.zoo["expert1"], name), "rb").read() \
                if name == "model.safetensors" else f"{name}: not the merge's\n".encode()
            with open(os.path.join(out, name), "wb") as fp:
                fp.write(data)
            before[name] = data
        return before

    def _make_fifo_jsonl(self, p):
        os.mkfifo(p)

    def _make_expert_fifo(self, p):
        self._copy_expert1(p)
        os.mkfifo(os.path.join(p, "extra"))

    def _make_expert_link(self, p):
        self._copy_expert1(p)
        os.remove(os.path.join(p, "model.safetensors"))
        os.symlink(os.path.join("..", "out-o4", "model.safetensors"),
                   os.path.join(p, "model.safetensors"))


# What a case mounts (in a user and mount namespace, as `unshare -rm` gives without root):
# a read-only folder, a full disk, a disk too small for the merge, a mount point out_path.
MOUNTS = {
    "ro": "mount -t tmpfs -o ro tmpfs ro",
    "full": "mount -t tmpfs -o size=64k tmpfs full && (cat /dev/zero > full/filler 2>/dev/null || true)",
    "small": "mount -t tmpfs -o size=40k tmpfs small",
    "mnt": "mount -t tmpfs tmpfs mnt",
    # not a mount: files past 64 KiB (in the shell's 1 KiB blocks) fail with EFBIG, as on
    # FAT32 past 4 GiB (Python ignores the SIGXFSZ that comes first)
    "fsize": "ulimit -f 64",
}


def can_mount() -> bool:
    """Whether this machine lets an unprivileged user and mount namespace mount a tmpfs."""
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def run_in_mount(world: "World", case: Case, args: List[str]) -> subprocess.CompletedProcess:
    """mergekit-com in a child process, with ``case.mount`` mounted in the world's root."""
    os.makedirs(world.path(case.mount), exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "mergekit_com.cli", *args])
    # what is left on the mounted filesystem, listed before it goes with the namespace
    script = f"{MOUNTS[case.mount]} && {{ {command}; s=$?; ls -A {case.mount}; exit $s; }}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=world.root, env=env,
                          capture_output=True, text=True, timeout=600)


def cli_args(world: World, case: Case, *extra: str) -> List[str]:
    return [os.path.basename(world.config_file(case)), case.out_path, "--quiet", *case.args,
            *extra]


def normalized(message: str, world: World) -> str:
    """A message as the docs show it: no machine-specific path, pid, host or time."""
    message = message.replace(world.root + os.sep, "")
    return re.sub(r"pid \d+ on host \S+, started [\d-]+ [\d:]+",
                  "pid PID on host HOST, started TIME", message)
