"""The model and its tokenizer: loaded from a directory (or hub id), or built from config."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from tunelab import data
from tunelab.errors import ModelError

log = logging.getLogger("tunelab")

SPECIALS = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "unk_token": "<unk>"}


def load_tokenizer(cfg: Any, rows: Any, source: str | None = None) -> Any:
    """The pretrained tokenizer at `source` (default `cfg.name_or_path`), or a byte-level BPE
    trained on the training texts of `rows` (tunelab.data.Rows) when there is none: trained once
    per data digest and vocab size, then read from the data cache."""
    source = source or cfg.name_or_path
    if source:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(source, exc) from None
        if tok.pad_token is None:  # most causal LMs ship without one; padding is masked anyway
            tok.pad_token = tok.eos_token
        return tok
    from transformers import PreTrainedTokenizerFast

    max_length = (cfg.arch or {}).get("n_positions")
    key = {"data": rows.digest, "vocab_size": cfg.tokenizer_vocab_size, "max_length": max_length}
    with data.cached(rows, "tokenizers", **key, version=TOKENIZER_VERSION) as entry:
        if not entry.hit:
            tok = train_tokenizer(rows.texts(), cfg.tokenizer_vocab_size, max_length)
            tok.save_pretrained(entry.building)
    # Read back from disk even when just trained: a cache hit then gives the very same tokenizer.
    return PreTrainedTokenizerFast.from_pretrained(entry.path)


# Bump when train_tokenizer changes what it makes: older cached tokenizers are then unused.
TOKENIZER_VERSION = 1

# The from-scratch tokenizer's chat template, so `messages` rows can train a model from
# scratch: each turn is `<|role|>` and a newline, its content, then the end-of-text token; the
# assistant's content and end token are marked for `return_assistant_tokens_mask`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]], vocab_size: int = 0, max_length: int | None = None
) -> Any:
    """Byte-level BPE on `texts` (strings, or batches of strings: an iterator is read once,
    never held). Every byte is in the alphabet, so no input is ever unknown; vocab_size 0 keeps
    bytes only (no merges), which keeps digits separate for arithmetic. It carries
    CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = list(SPECIALS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(alphabet) + len(specials)),
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    extra = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=CHAT_TEMPLATE, **SPECIALS, **extra
    )


def load_model(cfg: Any, tokenizer: Any, source: str | None, task: ModuleType, rows: Any) -> Any:
    """The pretrained model at `source` (default `cfg.name_or_path`) with the head `task` needs
    (its Auto class, the labels the rows hold), or a fresh one from `cfg.arch`. Weights the
    checkpoint did not have (a new classification head) are reported in one line."""
    import transformers

    auto = getattr(transformers, task.AUTO_CLASS)
    extra = task.model_kwargs(rows)
    source = source or cfg.name_or_path
    if source:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its multi-line warning becomes ours below
        try:
            model, info = auto.from_pretrained(
                source,
                trust_remote_code=cfg.trust_remote_code,
                # Without allow_pickle, transformers itself refuses pytorch_model.bin.
                use_safetensors=None if cfg.allow_pickle else True,
                output_loading_info=True,
                **extra,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(source, exc) from None
        finally:
            transformers.logging.set_verbosity(verbosity)
        fresh = sorted(info.get("missing_keys") or [])
        if fresh:
            shown = ", ".join(fresh[:6]) + (f" and {len(fresh) - 6} more" if len(fresh) > 6 else "")
            log.info("model: newly initialised (not in %s): %s", source, shown)
        embeddings: Any = model.get_input_embeddings()
        if len(tokenizer) > embeddings.num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        arch = dict(cfg.arch)
        config = transformers.AutoConfig.for_model(
            arch.pop("model_type"),
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **arch,
            **extra,
        )
        model = auto.from_config(config)
        positions = getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None
        )
        if model.can_generate() and positions:
            # Generation ends at the model's context. Without this, transformers' defaults (20
            # tokens in all, or a pipeline's 256 new ones, as `mlflow models serve` runs it) go
            # past a small model's positions: an IndexError instead of text.
            model.generation_config.max_length = positions
    if task.AUTO_CLASS == "AutoModelForCausalLM" and getattr(model, "loss_type", "") is None:
        # The loss transformers falls back to, without its warning for class names that do not
        # end in ForCausalLM (GPT2LMHeadModel).
        model.loss_type = "ForCausalLM"
    if model.config.pad_token_id is None:  # a decoder used as a classifier finds padding by it
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.can_generate():
        gen = model.generation_config
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.eos_token_id
    return model


def label_names(model: Any) -> list[str] | None:
    """A classifier's label names in id order (as its config.json has them), else None."""
    kind = type(model).__name__
    if not kind.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return None
    if getattr(model.config, "problem_type", None) == "regression":
        return None
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label)]


# peft's task type for each model.task: it picks the wrapper class (and, for classification, the
# head that trains beside the adapter).
def full_state_dict(trainer: Any) -> dict[str, Any] | None:
    """Under FSDP the full weights, gathered on rank 0 (a collective: every rank calls this);
    None otherwise (the model itself holds them)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)
