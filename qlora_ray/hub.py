"""Push a tuned model to the Hugging Face Hub with a model card that carries its leaderboard row.

What goes up is one of: the trial's adapter (peft, safetensors), a merged model folder
(``qlora-ray merge``), or an export folder (``qlora-ray export``: GGUF, Modelfile, check).
The card is generated here and replaces any README.md in that folder. The upload is one
commit through ``huggingface_hub``; the token is the one ``hf auth login`` saved (or
``HF_TOKEN``), read by huggingface_hub itself and never printed: error text is scrubbed of it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from qlora_ray import layout
from qlora_ray.errors import UserError

KINDS = ("adapter", "merged", "gguf")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHECK_FILES = (layout.EXPORT_CHECK_FILE, layout.MERGE_CHECK_FILE)


@dataclass
class UploadPlan:
    """What ``push`` sends: ``files`` (relative to ``folder``) plus the generated ``card`` as README.md."""

    repo_id: str
    kind: str
    folder: Path
    files: List[str]
    card: str
    trial: str = ""
    extra: dict = field(default_factory=dict)

    def listing(self) -> List[Tuple[str, int]]:
        """``(path in the repository, bytes)`` for every file, the card included."""
        rows = [(rel, (self.folder / rel).stat().st_size) for rel in self.files]
        return rows + [("README.md", len(self.card.encode("utf-8")))]


def plan_upload(target, repo_id: str, adapter: bool = False, merged: Optional[Path] = None,
                gguf: Optional[Path] = None, trust_remote_code: bool = False) -> UploadPlan:
    """The files and model card for pushing the trial at ``target`` (trial or experiment folder).
    ``trust_remote_code`` (the user's choice, never the adapter's spec) lets the base model's
    tokenizer code run for the data fingerprint."""
    from qlora_ray.model import adapter_spec, find_adapter

    if not _REPO_ID.match(repo_id):
        raise UserError(f"ORG/NAME: '{repo_id}' is not a Hub repository id like 'me/hinglish-lora'")
    if sum([adapter, merged is not None, gguf is not None]) > 1:
        raise UserError("give at most one of --adapter, --merged DIR, --gguf DIR")
    adapter_dir = find_adapter(target)
    spec = adapter_spec(adapter_dir, trust_remote_code)
    kind, folder = ("merged", Path(merged)) if merged else ("gguf", Path(gguf)) if gguf else ("adapter", adapter_dir)
    files = _files(kind, folder)
    trial_dir = adapter_dir.parent if adapter_dir.name == layout.ADAPTER_DIR else None
    row = _trial_row(trial_dir)
    check = next((json.loads((folder / f).read_text(encoding="utf-8")) for f in _CHECK_FILES
                  if (folder / f).is_file()), None)
    card = model_card(spec, row, kind, files, data_fingerprint(spec), check)
    return UploadPlan(repo_id=repo_id, kind=kind, folder=folder, files=files, card=card,
                      trial=row.trial_id if row else adapter_dir.name)


def _files(kind: str, folder: Path) -> List[str]:
    flag = {"adapter": "RUN", "merged": "--merged", "gguf": "--gguf"}[kind]
    if not folder.is_dir():
        raise UserError(f"{flag}: '{folder}' is not a folder")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and str(p.relative_to(folder)) != "README.md")
    needed = {"adapter": layout.ADAPTER_CONFIG, "merged": "config.json", "gguf": ".gguf"}[kind]
    if not any(f == needed or (needed == ".gguf" and f.endswith(".gguf")) for f in files):
        what = {"adapter": "an adapter", "merged": "a merged model (qlora-ray merge)",
                "gguf": "a GGUF export (qlora-ray export)"}[kind]
        raise UserError(f"{flag}: '{folder}' holds no {needed}; is it {what}?")
    return files


def _trial_row(trial_dir: Optional[Path]):
    from qlora_ray.records import Baseline
    from qlora_ray.results import read_trial

    if trial_dir is None or not trial_dir.is_dir():
        return None
    row = read_trial(trial_dir)
    if row.base_ppl is None:  # `qlora-ray train` keeps the base measure beside the trial
        for folder in (trial_dir, trial_dir.parent):
            base = Baseline.read(folder / layout.BASELINE_FILE)
            if base is not None and isinstance(base.perplexity, (int, float)):
                row.base_ppl = base.perplexity
                break
    return row


def data_fingerprint(spec) -> Optional[str]:
    """The tokenized-data cache key of the trial's data (files, tokenizer, template, settings), or
    None when the data is not on this machine (or on the Hub: it is not fetched for a card)."""
    from qlora_ray.data import cache
    from qlora_ray.data.encode import Encoder
    from qlora_ray.data.sources import resolve_source, source_identity

    if str(spec.data.train).startswith("hf://") or str(spec.data.eval or "").startswith("hf://"):
        return None
    from qlora_ray.model import load_tokenizer

    try:
        # The training tokenizer, as training built it: the adapter's saved copy hashes differently.
        tokenizer = load_tokenizer(spec.model, spec.data.cache_dir)
        sources = {"train": source_identity(resolve_source(spec.data.train, "data.train")),
                   "eval": source_identity(resolve_source(spec.data.eval, "data.eval")) if spec.data.eval else None}
        key, _ = cache.fingerprint(spec.data, sources, tokenizer, Encoder(tokenizer, spec.data.chat_template,
                                                                          spec.data.train_on_prompt).template)
        return key
    except (UserError, OSError, ValueError):
        return None


def _num(value, pattern: str) -> str:
    return "-" if not isinstance(value, (int, float)) else pattern.format(value)


def model_card(spec, row, kind: str, files: List[str], fingerprint: Optional[str], check: Optional[dict]) -> str:
    """README.md for the Hub: front matter, the leaderboard row, the export check, usage, the resolved spec."""
    from qlora_ray.spec import to_yaml

    base = spec.model.name
    front = ["---", "tags: [qlora-ray, qlora, lora" + (", gguf" if kind == "gguf" else "") + "]"]
    if "/" in base and not base.startswith(("/", ".", "~")) and not base.endswith(".gguf"):
        front.append(f"base_model: {base}")
    if kind == "adapter":
        front.append("library_name: peft")
    front.append("---")
    title = row.trial_id if row else spec.name
    lines = front + ["", f"# {title}", "",
                     f"QLoRA fine-tune of `{base}` trained with qlora-ray (job `{spec.name}`), uploaded as: {kind}.", "",
                     "| trial | base eval ppl | tuned eval ppl | change | train loss | steps | status |",
                     "| --- | --- | --- | --- | --- | --- | --- |"]
    if row is not None:
        lines.append(f"| {row.trial_id} | {_num(row.base_ppl, '{:.3f}')} | {_num(row.eval_ppl, '{:.3f}')} | "
                     f"{_num(row.ppl_change, '{:+.1%}')} | {_num(row.train_loss, '{:.4f}')} | "
                     f"{_num(row.step, '{}')} | {row.status} |")
    else:
        lines.append(f"| {spec.name} | - | - | - | - | - | not found |")
    lines += ["", "Perplexity: exp(summed token loss / target tokens) on the same held-out assistant tokens "
              "for the base model and the tuned one.", "",
              f"- Data fingerprint: `{fingerprint}`" if fingerprint else "- Data fingerprint: not available "
              "(the training data is not on the machine that pushed)",
              f"- Trained on: `{spec.data.train}`; evaluated on: `{spec.data.eval or 'a held-out fraction'}`"]
    if check:
        lines.append(_check_line(check))
    lines += ["", "## Use", "", "```", _usage(kind, files), "```", "",
              "## Resolved spec", "", "```yaml", to_yaml(spec).rstrip(), "```", ""]
    return "\n".join(lines)


def _check_line(check: dict) -> str:
    """The export's or merge's check as one card line: what was measured against what."""
    if "gguf_ppl" not in check:  # merge_check.json: the merged model against the adapter
        return (f"- Merge check: merged {check.get('dtype', '')} eval perplexity {_num(check.get('merged_ppl'), '{:.4f}')}"
                f" vs the adapter's {_num(check.get('adapter_ppl'), '{:.4f}')} (drift {_num(check.get('drift'), '{:+.2%}')})")
    merged = check.get("merged_ppl") is not None
    source, source_ppl = ("the fp32 merge's", check["merged_ppl"]) if merged else ("the adapter's", check.get("adapter_ppl"))
    line = (f"- Export check: {check.get('kind', 'merged')} GGUF {check.get('outtype', '')} eval perplexity "
            f"{_num(check.get('gguf_ppl'), '{:.4f}')} vs {source} {_num(source_ppl, '{:.4f}')} "
            f"(drift {_num(check.get('drift'), '{:+.2%}')})")
    if merged:
        line += (f"; adapter on its quantized base {_num(check.get('adapter_ppl'), '{:.4f}')} "
                 f"(merge gap {_num(check.get('merge_drift'), '{:+.2%}')})")
    return line


def _usage(kind: str, files: List[str]) -> str:
    if kind == "adapter":
        return ("from peft import AutoPeftModelForCausalLM\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(REPO)  # loads the base model, then the adapter")
    if kind == "merged":
        return "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(REPO)"
    gguf = next((f for f in files if f.endswith(".gguf")), "model.gguf")
    return f"llama-cli -hf REPO  # or download {gguf} and the Modelfile: ollama create NAME -f Modelfile"


def _scrub(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def upload(plan: UploadPlan, private: bool = False) -> str:
    """Create the repository if needed and upload ``plan`` as one commit; returns the repository URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if not get_token():
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token)")
    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(plan.folder / rel)) for rel in plan.files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode("utf-8")))
    try:
        url = api.create_repo(plan.repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo_id=plan.repo_id, repo_type="model", operations=operations,
                          commit_message=f"qlora-ray push: {plan.trial} ({plan.kind})")
    except Exception as e:  # noqa: BLE001 - network, auth and permission errors alike go to the user
        raise UserError(f"upload to {plan.repo_id} failed: {type(e).__name__}: {_scrub(str(e))}") from None
    return str(url)
