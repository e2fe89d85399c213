"""tunelab against plain Hugging Face Trainer, side by side, alternating, as ratios.

    python benchmarks/bench.py            # quick: 3 repetitions of 40 steps, ~5 min on 2 cores
    python benchmarks/bench.py --full     # 6 repetitions of 60 steps, ~20 min
    python benchmarks/bench.py --only data_preparation [--full]   # one section

Both modes train the 25M GPT-2 of issue 6 (n_embd 512, 8 layers; ~300 MB of weights plus Adam
state per checkpoint), and prepare a generated JSON Lines corpus (30k rows quick; 300k rows,
~140 MB, full) against the same work done by hand with `datasets`. Machines are noisy: read the
ratios (measured in the same run), not the absolute times. Writes benchmarks/results/report.json,
report.md and step_times.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = Path(__file__).resolve().parent / "results"


def model_overrides() -> list[str]:
    return [
        "model.arch.n_embd=512",
        "model.arch.n_layer=8",
        "model.arch.n_head=8",
        "data.train_size=4000",
        "data.eval_size=0",
        "training.batch_size=16",
        "training.eval_every=0",
        "training.log_every=5",
        "training.warmup_steps=0",
        "training.progress_bar=false",
    ]


def step_timer() -> Any:
    """A TrainerCallback recording the wall time between step ends (a checkpoint's stall lands
    in the step after it), and steps/s over all of training: from its start to `on_train_end`,
    which tunelab's Trainer signals only once the last checkpoint is committed."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.began = 0.0
            self.steps_per_s = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps_per_s = state.global_step / (time.perf_counter() - self.began)

        def times(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]

    return StepTimer()


def stages_to_model(overrides: list[str], root: Path) -> tuple[Any, Any, Any]:
    """(cfg, inputs, model) of a run of `overrides`, built by tunelab's own stages (data, base,
    tokenizer, the task's tokenized rows; the seeded weights), untracked: what both sides of a
    comparison train on."""
    from tunelab import config, stages, startpoint, tracking

    cfg = config.compose([*overrides, f"output.root={root / 'outputs'}", "tracking=none"])
    inputs = stages.prepare(cfg, startpoint.Start({}, finished=False, resume_from=None))
    return cfg, inputs, stages.build_model(cfg, inputs, tracking.NullTracker())


def run_tunelab(overrides: list[str], root: Path, timer: Any = None, extra: Any = ()) -> float:
    """Steps/s of a real tunelab run (default tracking into a sqlite store, checkpoints);
    `extra`: more Trainer callbacks."""
    from tunelab import config, runner

    timer = timer or step_timer()
    cfg = config.compose(
        [*overrides, f"output.root={root / 'outputs'}", f"tracking.uri=sqlite:///{root / 'm.db'}"]
    )
    runner.run(cfg, root / "run", overrides, callbacks=[timer, *extra])
    return float(timer.steps_per_s)


def run_plain(
    overrides: list[str], root: Path, save_every: int | None = None, timer: Any = None
) -> float:
    """Steps/s of plain Trainer on the same model, data and batch: no tracking, and no
    checkpoints unless `save_every`."""
    from transformers import Trainer, TrainingArguments

    cfg, inputs, model = stages_to_model(overrides, root)
    args = TrainingArguments(
        output_dir=str(root / "plain"),
        max_steps=cfg.training.max_steps,
        per_device_train_batch_size=cfg.training.batch_size,
        learning_rate=cfg.training.lr,
        # The same optimisation as the tunelab run: only the framework differs.
        weight_decay=cfg.training.weight_decay,
        warmup_steps=cfg.training.warmup_steps,
        lr_scheduler_type=cfg.training.lr_scheduler,
        max_grad_norm=cfg.training.max_grad_norm,
        logging_steps=cfg.training.log_every,
        report_to="none",
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,
        seed=cfg.seed,
    )
    timer = timer or step_timer()
    trainer = Trainer(
        model=model.module,
        args=args,
        train_dataset=inputs.prepared.train,
        data_collator=inputs.task.collator(inputs.tokenizer),
        callbacks=[timer],
    )
    trainer.train()
    return float(timer.steps_per_s)


def throughput(reps: int, steps: int) -> dict:
    """Steps/s over the whole of trainer.train() (checkpoint stalls and the wait for the last
    write included) of plain Trainer, tunelab (default tracking, a checkpoint every 10 steps) and
    plain Trainer with the same checkpoints. The three run back to back in each repetition, in
    an order that rotates, and each ratio is taken within a repetition (paired), then the median:
    on a noisy machine drift between repetitions is larger than the 5% being measured."""
    base = model_overrides() + [f"training.max_steps={steps}"]
    with_ckpt = base + ["checkpoint=steps", "checkpoint.every=10", "checkpoint.keep=2"]
    runs = {
        "plain": lambda root, timer: run_plain(base, root, timer=timer),
        "tunelab": lambda root, timer: run_tunelab(with_ckpt, root, timer=timer),
        "plain_ckpt": lambda root, timer: run_plain(base, root, save_every=10, timer=timer),
    }
    speed: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        timers = {name: step_timer() for name in runs}
        for name in names[rep % 3 :] + names[: rep % 3]:
            with tempfile.TemporaryDirectory() as tmp:
                speed[name].append(runs[name](Path(tmp), timers[name]))
        print(f"  rep {rep + 1}/{reps}: " + "  ".join(f"{n} {v[-1]:.2f}" for n, v in speed.items())
              + " steps/s", flush=True)  # fmt: skip
    plot_step_times({name: t.times() for name, t in timers.items()}, every=10)
    med = statistics.median
    paired = [t / p for t, p in zip(speed["tunelab"], speed["plain"], strict=True)]
    paired_ckpt = [c / p for c, p in zip(speed["plain_ckpt"], speed["plain"], strict=True)]
    return {
        "plain_steps_per_s": med(speed["plain"]),
        "tunelab_steps_per_s": med(speed["tunelab"]),
        "plain_with_checkpoints_steps_per_s": med(speed["plain_ckpt"]),
        "ratio_tunelab_vs_plain": med(paired),
        "ratio_tunelab_vs_plain_min": min(paired),
        "ratio_tunelab_vs_plain_max": max(paired),
        "ratio_plain_checkpointing_vs_plain": med(paired_ckpt),
        "targets": {"ratio_tunelab_vs_plain": ">= 0.95"},
    }


def save_timer() -> Any:
    """A TrainerCallback measuring how long each checkpoint blocks the training loop: from the
    end of its step (`on_step_end`) to `on_save`, which Trainer calls once its checkpoint save
    has returned; then `after_save()` if set (waiting out a background write, say)."""
    from transformers import TrainerCallback

    class SaveTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_end = 0.0
            self.stalls: list[float] = []
            self.after_save: Any = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_end = time.perf_counter()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stalls.append(time.perf_counter() - self.step_end)
            if self.after_save is not None:
                self.after_save()

    return SaveTimer()


def ddp_child(mode: str, root: str, steps: str, out: str) -> None:
    """One side of the DDP comparison, inside torchrun: rank 0 writes steps/s, how long each
    checkpoint blocked the loop, and the time of an in-memory copy of the state to `out`."""
    import torch

    base = [*model_overrides(), f"training.max_steps={steps}"]
    timer, saves = step_timer(), save_timer()
    if mode == "plain":
        speed = run_plain(base, Path(root), timer=timer)
    else:
        overrides = [*base, "checkpoint=steps", "checkpoint.every=10", "checkpoint.keep=2"]
        speed = run_tunelab(overrides, Path(root), timer=timer, extra=[saves])
    if int(os.environ.get("RANK", "0")) != 0:
        return
    copy_s = 0.0
    if mode == "tunelab":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(Path(root) / "run" / "model")
        adam = [(torch.zeros_like(p), torch.zeros_like(p)) for p in model.parameters()]
        began = time.perf_counter()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state.update({f"adam.{i}": (a.clone(), b.clone()) for i, (a, b) in enumerate(adam)})
        copy_s = time.perf_counter() - began
    steps_s = [t for i, t in enumerate(timer.times()) if (i + 2) % 10 != 1]  # no checkpoint
    result = {"steps_per_s": speed, "stalls": saves.stalls, "copy_s": copy_s,
              "median_step_s": statistics.median(steps_s)}  # fmt: skip
    Path(out).write_text(json.dumps(result))


def ddp(reps: int, steps: int) -> dict:
    """2 processes (torchrun, gloo on the CPU): plain Trainer DDP with neither tracking nor
    checkpoints against tunelab DDP with tracking and a checkpoint every 10 steps, paired within
    each repetition as `throughput` is; and tunelab's checkpoint stall under DDP against an
    in-memory copy of the same state (weights plus Adam moments). Both sides use
    ddp_find_unused_parameters=False (tunelab's default)."""
    import subprocess

    speed: dict[str, list[float]] = {"plain": [], "tunelab": []}
    step_s: dict[str, list[float]] = {"plain": [], "tunelab": []}
    stalls: list[float] = []
    first: list[float] = []
    copies: list[float] = []
    for rep in range(reps):
        for mode in ("plain", "tunelab") if rep % 2 == 0 else ("tunelab", "plain"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", __file__, "--ddp-child", mode, tmp,
                           str(steps), str(out)]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
                result = json.loads(out.read_text())
            speed[mode].append(result["steps_per_s"])
            step_s[mode].append(result["median_step_s"])
            if mode == "tunelab":
                first.extend(result["stalls"][:1])  # allocates the snapshot buffers
                stalls.extend(result["stalls"][1:])
                copies.append(result["copy_s"])
        print(f"  rep {rep + 1}/{reps}: " + "  ".join(f"{n} {v[-1]:.3f}" for n, v in speed.items())
              + " steps/s", flush=True)  # fmt: skip
    med = statistics.median
    paired = [t / p for t, p in zip(speed["tunelab"], speed["plain"], strict=True)]
    stall = med(stalls)
    return {
        "plain_ddp_steps_per_s": med(speed["plain"]),
        "tunelab_ddp_steps_per_s": med(speed["tunelab"]),
        "ratio_tunelab_vs_plain_ddp": med(paired),
        "ratio_tunelab_vs_plain_ddp_min": min(paired),
        "ratio_tunelab_vs_plain_ddp_max": max(paired),
        # Steps between checkpoints only: what tunelab adds to every step (tracking, the stop
        # agreement) apart from the checkpoints.
        "median_step_ratio_tunelab_vs_plain": med(step_s["tunelab"]) / med(step_s["plain"]),
        "checkpoint_stall_s": stall,
        "first_checkpoint_stall_s": med(first),
        "memory_copy_s": med(copies),
        "ratio_stall_vs_memory_copy": max(stall, 0.0) / med(copies),
        "targets": {"ratio_tunelab_vs_plain_ddp": ">= 0.95", "ratio_stall_vs_memory_copy": "<= 2"},
    }


def plot_step_times(times: dict[str, list[float]], every: int) -> Path:
    """Step time over the last repetition's runs, checkpoint steps marked: a stall is a spike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "plain": "plain Trainer, no checkpoints",
        "plain_ckpt": f"plain Trainer, checkpoint every {every} steps",
        "tunelab": f"tunelab (tracking, async checkpoint every {every} steps)",
    }
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, series in times.items():
        steps = range(2, len(series) + 2)  # the time between the ends of step s-1 and s
        ax.plot(steps, [t * 1000 for t in series], label=labels[name], linewidth=1.2)
    n_steps = max(len(s) for s in times.values()) + 1
    for step in range(every, n_steps + 1, every):
        ax.axvline(step + 0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("step (dotted: a checkpoint after that step)")
    ax.set_ylabel("step time (ms)")
    ax.set_title("Step time over a run: a checkpoint's stall shows as a spike after it")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "step_times.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def checkpoint_stall(reps: int) -> dict:
    """Seconds the training loop is blocked by one checkpoint of the same state (weights plus
    Adam state), in real training with a checkpoint every 5 steps, from the end of the step to
    Trainer's `on_save`: plain Trainer's synchronous save, tunelab's (a copy into reused CPU
    buffers, then written, fsynced and committed in the background; each background write is
    waited for after its stall is measured, so no stall includes the previous write), and an
    in-memory copy of the state (`clone`, allocating). The first checkpoint of a run is reported
    apart: it allocates tunelab's buffers."""
    import torch
    from transformers import Trainer, TrainingArguments

    from tunelab import stages, tracking

    every = 5
    steps = every * (reps + 1)
    overrides = model_overrides() + [
        f"training.max_steps={steps}", "checkpoint=steps", f"checkpoint.every={every}",
        "checkpoint.keep=1", "checkpoint.keep_best=false",
    ]  # fmt: skip
    results: dict[str, list[float]] = {"memory_copy_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, inputs, model = stages_to_model(overrides, root)
        plain = save_timer()
        args = TrainingArguments(
            output_dir=str(root / "plain"), max_steps=steps, report_to="none", use_cpu=True,
            per_device_train_batch_size=cfg.training.batch_size, save_strategy="steps",
            save_steps=every, save_total_limit=1, disable_tqdm=True, dataloader_pin_memory=False,
        )  # fmt: skip
        collate = inputs.task.collator(inputs.tokenizer)
        Trainer(model=model.module, args=args, train_dataset=inputs.prepared.train,
                data_collator=collate, callbacks=[plain]).train()  # fmt: skip
        cfg, inputs, model = stages_to_model(overrides, root)  # the same seed: the same start
        ours = save_timer()
        trainer = stages.build_trainer(cfg, root / "tunelab", model, inputs,
                                       tracking.NullTracker(), [ours])  # fmt: skip
        ours.after_save = trainer.writer.wait  # training steps would pass meanwhile
        trainer.train()
        for name, timer in (("plain_trainer", plain), ("tunelab", ours)):
            results[f"{name}_first_s"], results[f"{name}_s"] = timer.stalls[:1], timer.stalls[1:]
        snapshot = trainer.snapshot
        snapshot_bytes = sum(f.size for f in snapshot.files.values()) + sum(
            b.numel() * b.element_size() for b in snapshot.buffers.values()
        )
        assert trainer.optimizer is not None
        for _ in range(reps):
            began = time.perf_counter()
            state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            opt = trainer.optimizer.state_dict()["state"]
            state.update({f"opt.{k}.{n}": t.clone() for k, s in opt.items()
                          for n, t in s.items() if torch.is_tensor(t)})  # fmt: skip
            results["memory_copy_s"].append(time.perf_counter() - began)
    out = {k: statistics.median(v) for k, v in results.items()}
    out["ratio_tunelab_vs_plain"] = out["tunelab_s"] / out["plain_trainer_s"]
    out["ratio_tunelab_vs_memory_copy"] = out["tunelab_s"] / out["memory_copy_s"]
    out["targets"] = {"ratio_tunelab_vs_plain": "<= 0.2", "ratio_tunelab_vs_memory_copy": "<= 2"}
    out["snapshot_memory_mb"] = snapshot_bytes / 2**20
    return out


def tracking_and_artifacts(reps: int, step_s: float) -> dict:
    """Per-step metric logging against a step's time; logging the artifact into a local store
    against `cp -r` of the same bytes; loading it back against torch.load of a pickle."""
    import shutil
    import subprocess

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from tunelab import artifacts, tracking

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, inputs, built = stages_to_model(model_overrides(), root)
        model, tok = built.module, inputs.tokenizer
        uri = f"sqlite:///{root / 'm.db'}"
        tracker = tracking.MlflowTracker(uri, "bench", "bench", {})
        logs = {"loss": 1.0, "learning_rate": 1e-3, "grad_norm": 0.5, "epoch": 0.1}
        began = time.perf_counter()
        for step in range(200):
            tracker.log_metrics(logs, step)
        per_call = (time.perf_counter() - began) / 200
        tracker.flush_metrics()
        out["log_metrics_per_step_s"] = per_call
        out["ratio_logging_vs_step_time"] = per_call / step_s

        info = artifacts.ArtifactInfo("bench", 0, None, {}, "bench", 0, "bench", "", None)
        art = artifacts.save_final(root / "model", model, tok, OmegaConf.to_yaml(cfg), info)
        log_t, cp_t, load_t, pickle_t, plain_t = [], [], [], [], []
        torch.save(model.state_dict(), root / "weights.pt")
        collate = inputs.task.collator(tok)
        plain_ckpt = plain_trainer_checkpoint(model, tok, inputs.prepared.train, collate,
                                              root / "plain")  # fmt: skip
        for rep in range(reps):
            began = time.perf_counter()
            tracker.log_model(art, {"eval_loss": 1.0}, rep)
            log_t.append(time.perf_counter() - began)
            began = time.perf_counter()
            subprocess.run(["cp", "-r", str(art), str(root / f"copy{rep}")], check=True)
            cp_t.append(time.perf_counter() - began)
            shutil.rmtree(root / f"copy{rep}")
            began = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(art)
            load_t.append(time.perf_counter() - began)
            began = time.perf_counter()
            torch.load(root / "weights.pt", weights_only=True)
            pickle_t.append(time.perf_counter() - began)
            began = time.perf_counter()
            AutoModelForCausalLM.from_pretrained(plain_ckpt)
            plain_t.append(time.perf_counter() - began)
        tracker.finish("FINISHED")
    med = statistics.median
    out.update(
        {
            "log_artifact_s": med(log_t),
            "cp_same_bytes_s": med(cp_t),
            "ratio_log_artifact_vs_cp": med(log_t) / med(cp_t),
            "from_pretrained_artifact_s": med(load_t),
            "from_pretrained_plain_trainer_checkpoint_s": med(plain_t),
            "torch_load_same_weights_pickle_s": med(pickle_t),
        }
    )
    out["targets"] = {
        "ratio_logging_vs_step_time": "<= 0.02",
        "ratio_log_artifact_vs_cp": "<= 1.5",
    }
    return out


def plain_trainer_checkpoint(model: Any, tok: Any, train: Any, collate: Any, out: Path) -> Path:
    """A checkpoint written by plain Trainer of `model`: one step at learning rate 0 (the
    weights stay as they are), saved at its end."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, max_steps=1,
                             learning_rate=0.0, save_strategy="steps", save_steps=1,
                             disable_tqdm=True, dataloader_pin_memory=False)  # fmt: skip
    Trainer(model=model, args=args, processing_class=tok, train_dataset=train,
            data_collator=collate).train()  # fmt: skip
    return out / "checkpoint-1"


def cli_latency(reps: int) -> dict:
    import subprocess

    out = {}
    for name, args in {
        "help": ["--help"],
        "cfg_job": ["train", "--cfg", "job"],
        "config_error": ["train", "training.lr=-1"],
    }.items():
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True)
            times.append(time.perf_counter() - began)
        out[f"{name}_s"] = statistics.median(times)
    out["targets"] = {k: "< 1" for k in list(out)}
    return out


def write_corpus(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` JSON Lines rows of ~450 bytes of text: words of 2 to 9 letters from an 8000-word
    vocabulary, Zipf-distributed, 46 to 92 a row (300k rows: ~140 MB)."""
    import itertools
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(8000)]
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(vocab))))
    with open(path, "w") as f:
        for _ in range(rows):
            words = rng.choices(vocab, cum_weights=cum, k=rng.randint(46, 92))
            f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")


DATA_SETTINGS = {"vocab_size": 2000, "max_length": 128, "eval_fraction": 0.05, "seed": 1234}


def data_child(mode: str, corpus: str, root: str, lr: str = "3e-3") -> None:
    """One data preparation in this (fresh) process, timed after the imports: `tunelab`
    (the run's own `stages.prepare`: rows, tokenizer, the task's tokenized splits) or `by_hand`
    (the same work written directly against `datasets`, `tokenizers` and `transformers`)."""
    import logging

    import datasets  # noqa: F401  imported before the clock starts, in both modes
    import transformers  # noqa: F401

    from tunelab import config, stages, startpoint

    logging.getLogger("tunelab").setLevel(logging.ERROR)  # the truncation warnings
    st = DATA_SETTINGS
    began = time.perf_counter()
    if mode == "tunelab":
        cfg = config.compose(
            [f"output.root={root}", "data=text_files", f"data.train={corpus}",
             f"model.tokenizer_vocab_size={st['vocab_size']}",
             f"model.arch.n_positions={st['max_length']}", f"training.lr={lr}"]
        )  # fmt: skip
        inputs = stages.prepare(cfg, startpoint.Start({}, finished=False, resume_from=None))
        n = len(inputs.prepared.train) + len(inputs.prepared.eval or [])
    else:
        n = by_hand(corpus, root)
    print(json.dumps({"seconds": time.perf_counter() - began, "rows": n}))


def by_hand(corpus: str, root: str) -> int:
    """The recipe a careful user writes: load_dataset("json"), a held-out split, a byte-level BPE
    trained from batches of the training column, then a batched map of the tokenizer (with the
    processes tunelab would use, each on one thread)."""
    import datasets
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab import data

    datasets.disable_progress_bars()
    st = DATA_SETTINGS
    raw = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=root)
    splits = raw.train_test_split(test_size=st["eval_fraction"], seed=st["seed"])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=st["vocab_size"], special_tokens=["<|endoftext|>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    train = splits["train"]

    def batches() -> Any:
        for i in range(0, len(train), 1000):
            yield train[i : i + 1000]["text"]

    tok.train_from_iterator(batches(), trainer=trainer, length=len(train))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )
    procs = data.processes(len(raw))
    if procs > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as tunelab does in its workers
    tokenized = splits.map(
        lambda batch: fast(batch["text"], truncation=True, max_length=st["max_length"]),
        batched=True,
        num_proc=procs if procs > 1 else None,
        remove_columns=["text"],
    )
    return sum(len(s) for s in tokenized.values())


def _measure(args: list[str]) -> dict[str, float]:
    """Run `bench.py --data-child ARGS` in a fresh process: its time, and the peak memory of it
    and its worker processes, sampled every 50 ms, as resident memory (RSS, summed over the
    processes) and proportional (PSS: pages shared by forked workers counted once)."""
    import subprocess

    import psutil

    proc = subprocess.Popen(
        [sys.executable, __file__, "--data-child", *args], stdout=subprocess.PIPE, text=True
    )
    parent = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass  # a worker ended while being read
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"data preparation {args[0]} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {"s": result["seconds"], "rss_mb": peak_rss / 2**20, "pss_mb": peak_pss / 2**20}


def data_preparation(rows: int, reps: int) -> dict:
    """Preparing a generated JSON Lines corpus for training (read, hold out 5% for eval, train a
    2000-token BPE, tokenize to 128 tokens): tunelab against the same work by hand, each in a
    fresh process with an empty cache, in alternating order; then tunelab again in the same
    output root with another learning rate (a sweep's second job), which must reuse the cache.
    Ratios are paired within a repetition, then the median."""
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_corpus(corpus, rows)
        size_mb = corpus.stat().st_size / 2**20
        runs: dict[str, list[dict[str, float]]] = {"by_hand": [], "first": [], "second": []}
        for rep in range(reps):
            for name in ("by_hand", "tunelab") if rep % 2 == 0 else ("tunelab", "by_hand"):
                root = Path(tmp) / f"{name}-{rep}"
                if name == "by_hand":
                    runs["by_hand"].append(_measure(["by_hand", str(corpus), str(root)]))
                else:
                    runs["first"].append(_measure(["tunelab", str(corpus), str(root), "3e-3"]))
                    runs["second"].append(_measure(["tunelab", str(corpus), str(root), "1e-3"]))
            print(f"  rep {rep + 1}/{reps}: " + "  ".join(
                f"{n} {v[-1]['s']:.1f} s {v[-1]['rss_mb']:.0f} MB" for n, v in runs.items()
            ), flush=True)  # fmt: skip

    def ratio(a: str, b: str, what: str) -> float:
        return med([x[what] / y[what] for x, y in zip(runs[a], runs[b], strict=True)])

    return {
        "rows": rows,
        "corpus_mb": size_mb,
        "by_hand_s": med(r["s"] for r in runs["by_hand"]),
        "tunelab_s": med(r["s"] for r in runs["first"]),
        "tunelab_cached_s": med(r["s"] for r in runs["second"]),
        "by_hand_peak_rss_mb": med(r["rss_mb"] for r in runs["by_hand"]),
        "tunelab_peak_rss_mb": med(r["rss_mb"] for r in runs["first"]),
        "by_hand_peak_pss_mb": med(r["pss_mb"] for r in runs["by_hand"]),
        "tunelab_peak_pss_mb": med(r["pss_mb"] for r in runs["first"]),
        "ratio_time_tunelab_vs_by_hand": ratio("first", "by_hand", "s"),
        "ratio_rss_tunelab_vs_by_hand": ratio("first", "by_hand", "rss_mb"),
        "ratio_pss_tunelab_vs_by_hand": ratio("first", "by_hand", "pss_mb"),
        "ratio_time_cached_vs_first": ratio("second", "first", "s"),
        "targets": {
            "ratio_time_tunelab_vs_by_hand": "<= 1.0",
            "ratio_rss_tunelab_vs_by_hand": "<= 1.5",
            "ratio_time_cached_vs_first": "< 0.1",
        },
    }


def _search(root: Path, workers: int, pruner: str, steps: int) -> tuple[float, Any]:
    """One 8-trial Optuna search on the default task (a small model), `workers` copies of the
    same command started together, each on one thread; its wall time and its study."""
    import subprocess

    import optuna

    root.mkdir(parents=True)
    args = [sys.executable, "-m", "tunelab", "train", "-m", "hparams_search=addition_optuna",
            f"output.root={root / 'outputs'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "model.arch.n_embd=64", "model.arch.n_layer=2", "model.arch.n_head=2",
            "data.train_size=4000", "data.eval_size=200", f"training.max_steps={steps}",
            f"training.eval_every={steps // 10}", "training.warmup_steps=0",
            "training.progress_bar=false", "checkpoint=none",
            "sweep.objective=eval_token_accuracy", "hydra.sweeper.n_trials=8",
            f"hydra.sweeper.pruner={pruner}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    began = time.perf_counter()
    procs = [subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(workers)]  # fmt: skip
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - began
    if any(codes):
        raise RuntimeError(f"a search worker exited {codes} (see {root})")
    (db,) = (root / "outputs").glob("*/sweeps/*/optuna.db")
    return wall, optuna.load_study(study_name="tunelab", storage=f"sqlite:///{db}")


def _trained_steps(study: Any, steps: int) -> int:
    from optuna.trial import TrialState

    return sum(
        steps if t.state == TrialState.COMPLETE else max(t.intermediate_values or {0: 0})
        for t in study.trials
    )


def _slots(study: Any) -> tuple[float, float]:
    """The longest time a worker stood between telling a trial and claiming its next, and the
    makespan against the ideal (the trials' summed durations over the workers)."""
    by_worker: dict[str, list[Any]] = {}
    for t in study.trials:
        by_worker.setdefault(t.user_attrs["tunelab.worker"]["tunelab.pid"], []).append(t)
    gaps = [0.0]
    for trials in by_worker.values():
        trials.sort(key=lambda t: t.datetime_start)
        gaps += [(b.datetime_start - a.datetime_complete).total_seconds()
                 for a, b in zip(trials, trials[1:], strict=False)]  # fmt: skip
    first = min(t.datetime_start for t in study.trials)
    last = max(t.datetime_complete for t in study.trials)
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials)
    return max(gaps), (last - first).total_seconds() / (busy / len(by_worker))


def sweep(steps: int) -> dict:
    """Pruning and workers, on the same 8-trial search (TPE's first trials are random with a
    fixed seed, so one worker asks the same parameters with and without a pruner). Each pruner
    is measured; the issue's figure is the best of them whose best objective stays within 0.01
    of the unpruned search's. Trials evaluate 10 times: a pruner judges at evaluations only."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-sweep-") as tmp:
        root = Path(tmp)
        wall_none, none = _search(root / "none", 1, "none", steps)
        pruned = {p: _search(root / p, 1, p, steps) for p in ("median", "successive_halving",
                                                              "hyperband")}  # fmt: skip
        wall_two, two = _search(root / "two", 2, "none", steps)
        _, two_pruned = _search(root / "two-pruned", 2, "median", steps)
    fit = []
    for name, (wall, study) in pruned.items():
        ratio = _trained_steps(study, steps) / _trained_steps(none, steps)
        gap = abs(none.best_value - study.best_value)
        out[f"{name}_steps_ratio"], out[f"{name}_best_gap"] = ratio, gap
        out[f"{name}_wall_ratio"] = wall / wall_none
        if gap <= 0.01:
            fit.append((ratio, name))
    ratio, best = min(fit) if fit else (1.0, "none")
    out["pruned_steps_ratio"], out["pruned_by"] = ratio, best
    out["pruned_best_gap"] = out.get(f"{best}_best_gap", 0.0)
    out["two_workers_wall_ratio"] = wall_two / wall_none
    out["two_workers_trials"] = float(len(two.trials))
    idle, makespan = _slots(two_pruned)
    out["slot_idle_max_s"], out["makespan_over_ideal"] = idle, makespan
    out["targets"] = {
        "pruned_steps_ratio": "<= 0.5",
        "pruned_best_gap": "<= 0.01",
        "two_workers_wall_ratio": "<= 0.65",
        "slot_idle_max_s": "< 2",
        "makespan_over_ideal": "<= 1.15",
    }
    return out


SECTIONS = ("cli_latency", "throughput", "checkpoint_stall", "tracking_and_artifacts",
            "data_preparation", "ddp", "sweep")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more repetitions and steps")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--data-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-child", nargs=4, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.data_child:
        data_child(*opts.data_child)
        return
    if opts.ddp_child:
        ddp_child(*opts.ddp_child)
        return
    only = set(opts.only.split(",")) if opts.only else set(SECTIONS)
    if only - set(SECTIONS):
        parser.error(f"--only: unknown sections {', '.join(sorted(only - set(SECTIONS)))}")
    reps = opts.reps or (6 if opts.full else 3)
    steps = 60 if opts.full else 40
    mode = "full" if opts.full else "quick"
    print(f"tunelab benchmarks ({mode}: 25M GPT-2, {reps} reps, {steps} steps)", flush=True)
    report: dict[str, Any] = {"mode": mode, "reps": reps, "steps": steps}
    if "cli_latency" in only:
        print("CLI latency ...", flush=True)
        report["cli_latency"] = cli_latency(reps=3)
    if "throughput" in only:
        print("throughput: plain Trainer vs tunelab (tracking + a checkpoint every 10 steps) ...")
        report["throughput"] = throughput(reps, steps)
    if "checkpoint_stall" in only:
        print("checkpoint stall: plain Trainer vs tunelab vs an in-memory copy ...", flush=True)
        report["checkpoint_stall"] = checkpoint_stall(reps=3)
    if "tracking_and_artifacts" in only:
        print("tracking overhead, artifact logging and loading ...", flush=True)
        plain = report.get("throughput", {}).get("plain_steps_per_s")
        step_s = 1 / plain if plain else 0.1
        report["tracking_and_artifacts"] = tracking_and_artifacts(reps=3, step_s=step_s)
    if "data_preparation" in only:
        rows = 300_000 if opts.full else 30_000
        print(f"data preparation: {rows} rows, tunelab vs by hand with datasets ...", flush=True)
        report["data_preparation"] = data_preparation(rows, reps=2)
    if "ddp" in only:
        print("DDP, 2 processes (gloo): plain Trainer DDP vs tunelab DDP ...", flush=True)
        report["ddp"] = ddp(reps, 60 if opts.full else 30)
    if "sweep" in only:
        print("sweep: 8 Optuna trials, no pruner vs each pruner, 1 vs 2 workers ...", flush=True)
        report["sweep"] = sweep(600 if opts.full else 300)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["| measure | value | target | met |", "| --- | --- | --- | --- |"]
    missed = []
    for section in (name for name in SECTIONS if name in report):
        targets = report[section].get("targets", {})
        for key, value in report[section].items():
            if key == "targets":
                continue
            target = targets.get(key, "")
            met = meets(value, target) if target else None
            if met is False:
                missed.append(f"{section}.{key}")
            mark = {True: "yes", False: "**no**", None: ""}[met]
            shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
            lines.append(f"| {section}.{key} | {shown} | {target} | {mark} |")
    (RESULTS / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("every target met" if not missed else f"targets missed: {', '.join(missed)}")
    print(f"written: {RESULTS / 'report.json'}, report.md, step_times.png")


def meets(value: float, target: str) -> bool:
    op, bound = target.split()
    bound_s = float(bound)
    return {"<=": value <= bound_s, ">=": value >= bound_s, "<": value < bound_s}[op]


if __name__ == "__main__":
    main()
