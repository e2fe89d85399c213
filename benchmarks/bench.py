"""tunelab against plain Hugging Face Trainer, side by side, alternating, as ratios.

    python benchmarks/bench.py            # quick mode: a ~4M GPT-2, a few minutes on 2 cores
    python benchmarks/bench.py --full     # the 25M GPT-2 (n_embd 512, 8 layers) of issue 6

Machines are noisy: read the ratios (measured in the same run), not the absolute times. Writes
benchmarks/results/report.json and report.md.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = Path(__file__).resolve().parent / "results"


def model_overrides(full: bool) -> list[str]:
    width, layers = (512, 8) if full else (256, 4)
    return [
        f"model.arch.n_embd={width}",
        f"model.arch.n_layer={layers}",
        "model.arch.n_head=8",
        "data.train_size=4000",
        "data.eval_size=0",
        "training.batch_size=16",
        "training.eval_every=0",
        "training.log_every=5",
        "training.warmup_steps=0",
        "training.progress_bar=false",
    ]


def run_tunelab(overrides: list[str], root: Path) -> float:
    """Steps/s of a real tunelab run (default tracking into a sqlite store, checkpoints)."""
    from tunelab import config, runner

    cfg = config.compose(
        [*overrides, f"output.root={root / 'outputs'}", f"tracking.uri=sqlite:///{root / 'm.db'}"]
    )
    result = runner.run(cfg, root / "run", overrides)
    return result.metrics["train_steps_per_second"]


def run_plain(overrides: list[str], root: Path, save_every: int | None = None) -> float:
    """Steps/s of plain Trainer on the same model, data and batch: no tracking, and no
    checkpoints unless `save_every`."""
    from transformers import Trainer, TrainingArguments, set_seed

    from tunelab import config, data
    from tunelab import model as models

    cfg = config.compose(overrides)
    rows = data.load(cfg.data)
    tok = models.load_tokenizer(cfg.model, rows.texts())
    train = data.tokenize(rows.train, tok, cfg.data.max_length)
    set_seed(cfg.seed)
    model = models.load_model(cfg.model, tok)
    args = TrainingArguments(
        output_dir=str(root / "plain"),
        max_steps=cfg.training.max_steps,
        per_device_train_batch_size=cfg.training.batch_size,
        learning_rate=cfg.training.lr,
        logging_steps=cfg.training.log_every,
        report_to="none",
        save_strategy="steps" if save_every else "no",
        save_steps=save_every or 500,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=cfg.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=data.collator(tok))
    return trainer.train().metrics["train_steps_per_second"]


def throughput(full: bool, reps: int, steps: int) -> dict:
    base = model_overrides(full) + [f"training.max_steps={steps}"]
    with_ckpt = base + ["checkpoint=steps", "checkpoint.every=10", "checkpoint.keep=2"]
    plain, tuned, plain_ckpt = [], [], []
    for rep in range(reps):  # alternate, so drift hits both sides alike
        with tempfile.TemporaryDirectory() as tmp:
            plain.append(run_plain(base, Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            tuned.append(run_tunelab(with_ckpt, Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            plain_ckpt.append(run_plain(base, Path(tmp), save_every=10))
        print(f"  rep {rep + 1}/{reps}: plain {plain[-1]:.2f}  tunelab {tuned[-1]:.2f}  "
              f"plain+ckpt {plain_ckpt[-1]:.2f} steps/s", flush=True)  # fmt: skip
    med = statistics.median
    return {
        "plain_steps_per_s": med(plain),
        "tunelab_steps_per_s": med(tuned),
        "plain_with_checkpoints_steps_per_s": med(plain_ckpt),
        "ratio_tunelab_vs_plain": med(tuned) / med(plain),
        "ratio_plain_checkpointing_vs_plain": med(plain_ckpt) / med(plain),
        "targets": {"ratio_tunelab_vs_plain": ">= 0.95"},
    }


def checkpoint_stall(full: bool, reps: int) -> dict:
    """Seconds the training loop is blocked by one checkpoint of the same state (weights plus
    Adam state): plain Trainer's synchronous save, tunelab's (commit with fsync and manifest),
    and an in-memory copy of the state (the floor an asynchronous save could reach)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from tunelab import checkpoints, config, data
    from tunelab import model as models

    overrides = model_overrides(full) + ["training.max_steps=2"]
    cfg = config.compose([*overrides, "checkpoint=steps", "checkpoint.every=1000"])
    rows = data.load(cfg.data)
    tok = models.load_tokenizer(cfg.model, rows.texts())
    train = data.tokenize(rows.train[:256], tok, cfg.data.max_length)
    results: dict[str, list[float]] = {"plain_trainer_s": [], "tunelab_s": [], "memory_copy_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("plain_trainer_s", Trainer),
                          ("tunelab_s", checkpoints.trainer_class(cfg.checkpoint))):  # fmt: skip
            model = models.load_model(cfg.model, tok)
            args = TrainingArguments(
                output_dir=str(Path(tmp) / name), max_steps=2, report_to="none", use_cpu=True,
                per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True,
                dataloader_pin_memory=False,
            )  # fmt: skip
            collate = data.collator(tok)
            trainer = cls(model=model, args=args, train_dataset=train, data_collator=collate)
            trainer.train()  # optimizer state exists now
            for rep in range(reps):
                trainer.state.global_step = 100 + rep
                began = time.perf_counter()
                trainer._save_checkpoint(trainer.model, trial=None)
                results[name].append(time.perf_counter() - began)
            if name == "tunelab_s":
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
    return out


def tracking_and_artifacts(full: bool, reps: int, step_s: float) -> dict:
    """Per-step metric logging against a step's time; logging the artifact into a local store
    against `cp -r` of the same bytes; loading it back against torch.load of a pickle."""
    import shutil
    import subprocess

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from tunelab import artifacts, config, data, tracking
    from tunelab import model as models

    cfg = config.compose(model_overrides(full))
    rows = data.load(cfg.data)
    tok = models.load_tokenizer(cfg.model, rows.texts())
    model = models.load_model(cfg.model, tok)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'm.db'}"
        tracker = tracking.MlflowTracker(uri, "bench", "bench", {})
        logs = {"loss": 1.0, "learning_rate": 1e-3, "grad_norm": 0.5, "epoch": 0.1}
        began = time.perf_counter()
        for step in range(200):
            tracker.log_metrics(logs, step)
        per_call = (time.perf_counter() - began) / 200
        tracker.flush()
        out["log_metrics_per_step_s"] = per_call
        out["ratio_logging_vs_step_time"] = per_call / step_s

        art = artifacts.save_final(root / "model", model, tok, OmegaConf.to_yaml(cfg), {"step": 0})
        log_t, cp_t, load_t, pickle_t = [], [], [], []
        torch.save(model.state_dict(), root / "weights.pt")
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
        tracker.finish("FINISHED")
    med = statistics.median
    out.update(
        {
            "log_artifact_s": med(log_t),
            "cp_same_bytes_s": med(cp_t),
            "ratio_log_artifact_vs_cp": med(log_t) / med(cp_t),
            "from_pretrained_s": med(load_t),
            "torch_load_pickle_s": med(pickle_t),
        }
    )
    out["targets"] = {
        "ratio_logging_vs_step_time": "<= 0.02",
        "ratio_log_artifact_vs_cp": "<= 1.5",
    }
    return out


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
    out["targets"] = {k: "< 1 s" for k in list(out)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the 25M model, more steps")
    parser.add_argument("--reps", type=int, default=None)
    opts = parser.parse_args()
    reps = opts.reps or (3 if opts.full else 2)
    steps = 60 if opts.full else 100
    print(f"tunelab benchmarks ({'full' if opts.full else 'quick'}: {reps} reps, {steps} steps)")
    report = {"mode": "full" if opts.full else "quick", "reps": reps, "steps": steps}
    print("CLI latency ...", flush=True)
    report["cli_latency"] = cli_latency(reps=3)
    print("throughput: plain Trainer vs tunelab (tracking + a checkpoint every 10 steps) ...")
    report["throughput"] = throughput(opts.full, reps, steps)
    print("checkpoint stall: plain Trainer vs tunelab vs an in-memory copy ...", flush=True)
    report["checkpoint_stall"] = checkpoint_stall(opts.full, reps=3)
    print("tracking overhead, artifact logging and loading ...", flush=True)
    step_s = 1 / report["throughput"]["plain_steps_per_s"]
    report["tracking_and_artifacts"] = tracking_and_artifacts(opts.full, reps=3, step_s=step_s)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["| measure | value | target |", "| --- | --- | --- |"]
    for section in ("cli_latency", "throughput", "checkpoint_stall", "tracking_and_artifacts"):
        targets = report[section].get("targets", {})
        for key, value in report[section].items():
            if key != "targets":
                lines.append(f"| {section}.{key} | {value:.4g} | {targets.get(key, '')} |")
    (RESULTS / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {RESULTS / 'report.json'}, {RESULTS / 'report.md'}")


if __name__ == "__main__":
    main()
