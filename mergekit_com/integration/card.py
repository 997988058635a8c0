"""The model card of a CoM merge: mergekit's card, extended.

The staged ``run_merge`` (``staged_merge.py``) has mergekit skip its card and
writes it here instead, with mergekit's public ``generate_card``: the card
keeps mergekit's text and front matter, gains the ``chain-of-merges`` tag,
and a section with the method, the parameters used, each expert's
calibration source (read back from ``com_report.json``) and the citation.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from huggingface_hub import ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from mergekit.card import generate_card, modelref_md
from mergekit.common import ModelReference

from mergekit_com.integration import mergekit_internals
from mergekit_com.io.report import REPORT_NAME
from mergekit_com.method.parameters import PAPER_URL

TAG = "chain-of-merges"

BIBTEX = """@misc{buzzega2025chainofmerges,
  title         = {Rethinking Layer-wise Model Merging through Chain of Merges},
  author        = {Buzzega, Pietro and Salami, Riccardo and Porrello, Angelo and Calderara, Simone},
  year          = {2025},
  eprint        = {2508.21421},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2508.21421}
}"""

_CHAIN_TEXT = {
    "module": "measured in the already merged model, including the merged linears and norms "
              "of the same layer (`chain: module`, the method of the paper)",
    "block": "measured in the already merged model up to each layer, then each expert's own "
             "weights inside it (`chain: block`)",
    "none": "measured in each expert's own model (`chain: none`, i.e. RegMean)",
}


def _value(v: Any) -> str:
    if isinstance(v, dict) and "varies" in v:
        return "per tensor: " + ", ".join(f"`{x}`" for x in v["varies"])
    return f"`{v}`"


def com_section(report: Optional[Dict[str, Any]]) -> str:
    settings = (report or {}).get("settings", {})
    chain = settings.get("chain")
    how = _CHAIN_TEXT.get(chain, "measured as set by `chain`") if isinstance(chain, str) else (
        "measured as set by `chain`")
    lines = [
        "### Chain of Merges",
        "",
        f"Merged with [Chain of Merges]({PAPER_URL}) (CoM; Buzzega et al., 2025) through the "
        "`mergekit-com` package: layer by layer in forward order, every linear layer is solved "
        "in closed form so that its outputs match each expert's on that expert's calibration "
        f"data, with its inputs {how}. Embeddings, norms and other tensors follow the "
        "`fallback` rule.",
        "",
    ]
    if settings:
        lines += ["| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | {_value(v)} |" for k, v in settings.items()]
        lines.append("")
    experts = (report or {}).get("experts", [])
    if experts:
        lines += [
            "#### Calibration data",
            "",
            "| model | weight | calibration source | samples | tokens | SHA-256 or revision |",
            "|---|---|---|---|---|---|",
        ]
        for e in experts:
            cal = e.get("calibration") or {}
            lines.append(
                f"| {modelref_md(ModelReference.model_validate(e['model']))} | {_value(e['weight'])} "
                f"| {_source_md(cal)} | {cal.get('samples')} | {cal.get('tokens')} "
                f"| {_version_md(cal)} |"
            )
        sources = [{k: v for k, v in (e.get("calibration") or {}).items()
                    if k not in ("samples", "tokens")} for e in experts]
        if len(experts) > 1 and all(s == sources[0] for s in sources):
            lines += ["", f"All {len(experts)} experts shared one calibration source."]
        lines += [
            "",
            f"`{REPORT_NAME}` holds, per layer and expert, the regression's relative residual "
            "and the covariate shift between this model's activations and the expert's own.",
            "",
        ]
    lines += ["### Citation", "", "```bibtex", BIBTEX, "```", ""]
    return "\n".join(lines)


def _source_md(cal: Dict[str, Any]) -> str:
    """A file name, or a dataset with the split and settings it was read with."""
    if "dataset" not in cal:
        text = f"`{cal.get('file')}`"
    else:
        name = cal["dataset"]
        text = (f"[`{name}`](https://huggingface.co/datasets/{name})" if "/" in name
                else f"`{name}`") + f", split `{cal.get('split')}`"
        if cal.get("config"):
            text += f", config `{cal['config']}`"
    for key in ("column", "template"):
        if cal.get(key) is not None:
            text += f", {key} `{' '.join(repr(cal[key])[1:-1].split())}`"
    return text.replace("|", "\\|")


def _version_md(cal: Dict[str, Any]) -> str:
    if "dataset" in cal:
        return f"revision `{cal['revision']}`" if cal.get("revision") else "n/a"
    return f"`{cal.get('sha256') or 'n/a (directory)'}`"


def extend_card(card_md: str, report: Optional[Dict[str, Any]]) -> str:
    """mergekit's card with the CoM tag and section (before its configuration block)."""
    card = ModelCard(card_md)
    data = card.data
    data.library_name = data.library_name or "transformers"
    tags = list(data.tags or [])
    for tag in ("mergekit", "merge", TAG):
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    if not data.base_model:
        data.base_model = None  # the Hub wants repo ids; local inputs have none
    section = com_section(report)
    text = card.text
    marker = "### Configuration"
    text = text.replace(marker, section + "\n" + marker, 1) if marker in text else (
        text.rstrip() + "\n\n" + section)
    card.text = text
    return str(card)


def is_hub_reference(path: str) -> bool:
    """Whether mergekit loads ``path`` from the Hub: no local path of that name, a valid id.

    Decided without the network, as mergekit's loader decides it; mergekit's card asks the
    Hub about existing local folders named like ``dir/model``.
    """
    if os.path.exists(path):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def card_markdown(config, config_yaml: str, name: str,
                  report: Optional[Dict[str, Any]] = None) -> str:
    """mergekit's card for this merge, extended with the CoM section."""
    with mergekit_internals.card_hub_check(is_hub_reference):  # links Hub models only
        text = generate_card(config=config, config_yaml=config_yaml, name=name)
        return extend_card(text, report)


def write_card(config, config_yaml: str, out_dir: str) -> None:
    """``README.md`` and ``mergekit_config.yml``, as mergekit's ``run_merge`` writes them,
    with the card extended (called after the merge, so the report is there to read; inside
    ``mergekit_internals.referenced_models_in_order``, so the models are listed in config
    order, not a set's, and the card is the same from run to run)."""
    path = os.path.join(out_dir, REPORT_NAME)
    report = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fp:
            report = json.load(fp)
    text = card_markdown(config, config_yaml, os.path.basename(out_dir), report)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fp:
        fp.write(text)
    with open(os.path.join(out_dir, "mergekit_config.yml"), "w", encoding="utf-8") as fp:
        fp.write(config_yaml)
