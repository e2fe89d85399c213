"""`tunelab generate` and `tunelab predict`: a model directory loaded to check it by eye.

A directory handed to these commands may come from anywhere (a download, a store someone else
writes), so it is looked at before transformers loads it: nothing in it may point outside it
(a symlink), name code of its own (`auto_map`), or hold only pickle weights. The weights are
read as safetensors only, and no code from the directory ever runs. Every refusal is one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.constants import PICKLE_SUFFIXES
from tunelab.errors import ModelRefused, first_line


def checked(path: str | Path) -> Path:
    """`path` as a model directory safe to load, or ModelRefused saying why."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelRefused(f"{path}: not a model directory")
    root = directory.resolve()
    for file in sorted(directory.rglob("*")):
        if file.is_symlink() and not file.resolve().is_relative_to(root):
            raise ModelRefused(
                f"{path}: {file.relative_to(directory)} is a link to {file.resolve()}, outside "
                "the directory; a model directory must hold its own files"
            )
    config = _json(directory / "config.json", path)
    for name in ("config.json", "tokenizer_config.json"):
        found = config if name == "config.json" else _json(directory / name, path, required=False)
        if found.get("auto_map"):
            raise ModelRefused(
                f"{path}: {name} names code of its own (auto_map: "
                f"{', '.join(map(str, found['auto_map'].values()))[:120]}); generate and predict "
                "never run a model directory's code: load it yourself with trust_remote_code=True "
                "if you trust it"
            )
    weights = {p.name for p in directory.iterdir() if p.is_file()}
    if not any(n.endswith(".safetensors") for n in weights):
        pickles = sorted(n for n in weights if n.endswith(PICKLE_SUFFIXES))
        held = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ModelRefused(
            f"{path}: holds {held}; generate and predict read safetensors only (unpickling can "
            "run code)"
        )
    return directory


def _json(file: Path, path: str | Path, required: bool = True) -> dict[str, Any]:
    if not file.is_file():
        if required:
            raise ModelRefused(f"{path}: no {file.name}; not a model directory")
        return {}
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelRefused(f"{path}: {file.name} is not readable JSON ({exc})") from None
    if not isinstance(found, dict):
        raise ModelRefused(f"{path}: {file.name} is not a JSON object")
    return found


def _loaded(load: Any, path: Path, **kwargs: Any) -> Any:
    """`load(path, ...)` without running the directory's code or unpickling anything; a model
    transformers cannot load is one line. transformers' warnings and bars stay out of the way
    of the answer."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load(str(path), trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = first_line(exc)
        raise ModelRefused(f"{path}: cannot load it: {first}") from None


def generate(path: str, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy continuation of `prompt` by the model in `path`, special tokens dropped. The
    continuation stops at the model's last position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = checked(path)
    if not prompt.strip():
        raise ModelRefused("the prompt is empty; give the text to continue")
    tok = _loaded(AutoTokenizer.from_pretrained, directory)
    model = _loaded(AutoModelForCausalLM.from_pretrained, directory, use_safetensors=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    length = int(ids["input_ids"].shape[1])
    if length == 0:
        raise ModelRefused("the prompt is no tokens for this tokenizer; give other text")
    positions = _positions(model.config)
    if positions is not None and length >= positions:
        raise ModelRefused(
            f"the prompt is {length} tokens; this model reads at most {positions} positions, "
            "and needs one more to continue: shorten it"
        )
    room = max_new_tokens if positions is None else min(max_new_tokens, positions - length)
    out = model.generate(**ids, max_new_tokens=room, max_length=None, do_sample=False)
    return str(tok.decode(out[0][length:], skip_special_tokens=True))


def _positions(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def predict(path: str, texts: list[str]) -> list[str]:
    """Each text's label and score (a classifier), or its tagged entities (a tagger). A text
    longer than the model reads is cut to its positions."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

    directory = checked(path)
    architectures = _loaded(AutoConfig.from_pretrained, directory).architectures or [""]
    if architectures[0].endswith("ForTokenClassification"):
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        model = _loaded(
            AutoModelForTokenClassification.from_pretrained, directory, use_safetensors=True
        )
        tok = _loaded(AutoTokenizer.from_pretrained, directory)
        tagger = pipeline(
            "token-classification", model=model, tokenizer=tok, aggregation_strategy="simple"
        )
        limit = _positions(model.config)
        return [
            " ".join(f"{e['word']}/{e['entity_group']}" for e in found) or "(no entities)"
            for found in tagger([_cut(tok, t, limit) for t in texts])
        ]
    if not architectures[0].endswith("ForSequenceClassification"):
        raise ModelRefused(f"{path} holds a {architectures[0]}; predict takes a classifier")
    from transformers import AutoTokenizer

    model = _loaded(
        AutoModelForSequenceClassification.from_pretrained, directory, use_safetensors=True
    )
    tok = _loaded(AutoTokenizer.from_pretrained, directory)
    classifier = pipeline("text-classification", model=model, tokenizer=tok)
    return [f"{r['label']} ({r['score']:.3f})" for r in classifier(texts, truncation=True)]


def _cut(tok: Any, text: str, limit: int | None) -> str:
    """`text` cut to the words that fit in `limit` positions (special tokens included)."""
    if limit is None:
        return text
    enc = tok(text, truncation=True, max_length=limit, return_offsets_mapping=True)
    ends = [end for _, end in enc["offset_mapping"] if end]
    return text[: max(ends)] if ends else text
