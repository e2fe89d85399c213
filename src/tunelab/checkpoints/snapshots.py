"""Checkpoint state captured at a step boundary and written in the background.

The training loop only copies: model weights into CPU buffers kept from one checkpoint to the
next, and the optimizer state (two thirds of the bytes with Adam) straight into the memory image
of its safetensors file. A writer thread then saves, hashes and commits. On a machine whose
cores training keeps busy, the cost that remains is the CPU the write itself takes, so the
optimizer file goes to disk with O_DIRECT (the disk reads it from our buffer; no copy into the
page cache) and its checksum is taken from memory instead of reading the file back.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any

from tunelab.adapters import is_peft
from tunelab.errors import CheckpointWriteFailed

OPTIMIZER = "optimizer.safetensors"  # tensors; param groups and plain values in its metadata
ADAPTER = "adapter_model.safetensors"  # a PEFT model's checkpoint: the adapter, not the model
SCHEDULER = "scheduler.json"
_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to the block size
_CHUNK = 64 << 20
_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
           "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
           "bool": "BOOL"}  # fmt: skip


class BackgroundWriter:
    """Runs one checkpoint write at a time in a thread; its failure is raised in the training
    loop at the next step, at the next checkpoint or at the end of training."""

    def __init__(self) -> None:
        self._done: threading.Event | None = None
        self._error: BaseException | None = None
        self._name = ""

    def start(self, write: Any, name: str) -> None:
        done = threading.Event()

        def body() -> None:
            try:
                write()
            except BaseException as exc:  # reported in the training thread
                self._error = exc
            finally:
                done.set()

        self._name, self._done = name, done
        threading.Thread(target=body, name=f"tunelab-{name}", daemon=True).start()

    def __str__(self) -> str:
        return self._name or "a checkpoint"

    @property
    def busy(self) -> bool:
        return self._done is not None and not self._done.is_set()

    def wait(self, raise_error: bool = True) -> None:
        """Until the write in flight is committed. Waits on an event rather than joining the
        thread: a join that a signal interrupted can return at once when asked again (Python
        3.11), an event wait cannot."""
        if self._done is not None:
            self._done.wait()
            self._done = None
        if raise_error:
            self.check()

    def check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteFailed(
                f"writing {self._name} failed: {error}. Older checkpoints are intact."
            ) from error

    def callback(self) -> Any:
        """A TrainerCallback raising a failed write at the next step, and ending training (for
        every callback after it) only once the last checkpoint is committed."""
        from transformers import TrainerCallback

        writer = self

        class WaitForWrites(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                writer.check()

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                writer.wait()

        return WaitForWrites()


def _header(specs: list[tuple[str, Any, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in specs:
        kind = _DTYPES[str(dtype).removeprefix("torch.")]
        span = [offset, offset + nbytes]
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": span}
        offset += nbytes
    return json.dumps(header, separators=(",", ":")).encode()


class StagedFile:
    """A safetensors file laid out in one page-aligned buffer (8-byte length, JSON header padded
    with spaces to a block boundary, then the tensors): filling it is a memcpy per tensor, and
    it is written with one O_DIRECT write. Loaded back with plain `safetensors`."""

    def __init__(self, specs: list[tuple[str, Any, tuple[int, ...], int]], header_room: int):
        import torch

        self.specs = specs
        self.data_start = -(-(8 + header_room) // _ALIGN) * _ALIGN
        self.size = self.data_start + sum(n for *_, n in specs)
        self.buffer = mmap.mmap(-1, max(_ALIGN, -(-self.size // _ALIGN) * _ALIGN))
        raw = torch.frombuffer(self.buffer, dtype=torch.uint8)
        self.views, offset = {}, self.data_start
        for name, dtype, shape, nbytes in specs:
            self.views[name] = raw[offset : offset + nbytes].view(dtype).view(shape)
            offset += nbytes

    @staticmethod
    def specs_of(tensors: dict[str, Any]) -> list[tuple[str, Any, tuple[int, ...], int]]:
        # Widest dtypes first, as safetensors does, so every tensor starts naturally aligned.
        order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
        return [(k, v.dtype, tuple(v.shape), v.numel() * v.element_size()) for k, v in order]

    def fill(self, tensors: dict[str, Any], header: bytes) -> None:
        room = self.data_start - 8
        self.buffer[:8] = struct.pack("<Q", room)
        self.buffer[8 : self.data_start] = header.ljust(room, b" ")
        for name, tensor in tensors.items():
            self.views[name].copy_(tensor.detach(), non_blocking=tensor.is_cuda)

    def write(self, path: Path) -> str:
        """Write the file (O_DIRECT where the filesystem allows it), fsync it, and return the
        xxh3_128 of its bytes, taken from memory."""
        import xxhash

        view = memoryview(self.buffer)
        digest = xxhash.xxh3_128(view[: self.size]).hexdigest()
        try:
            _write_fd(path, view[: -(-self.size // _ALIGN) * _ALIGN], os.O_DIRECT)
        except (OSError, AttributeError):  # tmpfs, some network filesystems; not Linux
            _write_fd(path, view[: self.size], 0)
        _truncate(path, self.size)
        return digest


def _write_fd(path: Path, data: memoryview, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    try:
        offset = 0
        while offset < len(data):
            offset += os.write(fd, data[offset : offset + _CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # the O_DIRECT write ended on a block boundary
            os.fsync(fd)
    finally:
        os.close(fd)


class Snapshot:
    """CPU copies of the state, in memory kept from one checkpoint to the next, so a snapshot
    costs a memcpy, not an allocation. Memory cost: one copy of the weights and of the optimizer
    state. Tensors that share storage (tied weights) stay shared in the copy."""

    def __init__(self) -> None:
        self.buffers: dict[str, Any] = {}
        self.files: dict[str, StagedFile] = {}
        self._cuda = False

    def take(self, prefix: str, tree: Any) -> Any:
        """`tree` (nested dicts of tensors and plain values) with every tensor copied."""
        import copy

        import torch

        seen: dict[tuple, Any] = {}

        def copy_tree(node: Any, key: str) -> Any:
            if isinstance(node, dict):
                return {k: copy_tree(v, f"{key}.{k}") for k, v in node.items()}
            if not torch.is_tensor(node):
                return copy.deepcopy(node)
            ident = (node.untyped_storage().data_ptr(), node.storage_offset(), node.shape)
            if node.numel() and ident in seen:
                return seen[ident]
            buf = self.buffers.get(key)
            if buf is None or buf.shape != node.shape or buf.dtype != node.dtype:
                pin = node.is_cuda and torch.cuda.is_available()
                buf = torch.empty(node.shape, dtype=node.dtype, device="cpu", pin_memory=pin)
                self.buffers[key] = buf
            buf.copy_(node.detach(), non_blocking=node.is_cuda)
            self._cuda = self._cuda or node.is_cuda
            seen[ident] = buf
            return buf

        return copy_tree(tree, prefix)

    def stage_optimizer(self, state: dict[str, Any]) -> StagedFile | dict[str, Any]:
        """The optimizer state staged as the image of `optimizer.safetensors`; or, for an
        optimizer whose state is neither tensors nor JSON, a copied state dict (written with
        torch.save, as Trainer does)."""
        import torch

        tensors, plain = {}, {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value) and str(value.dtype).removeprefix("torch.") in _DTYPES:
                    tensors[f"state.{index}.{name}"] = value
                else:
                    plain[f"{index}.{name}"] = value
        try:
            metadata = {
                "format": "tunelab.optimizer/1",
                "param_groups": json.dumps(state["param_groups"]),
                "plain_state": json.dumps(plain),
            }
        except TypeError:
            return self.take("optimizer", state)
        return self.stage("optimizer", tensors, metadata)

    def stage(self, name: str, tensors: dict[str, Any], metadata: dict[str, str]) -> StagedFile:
        """`tensors` copied into the staged image of a safetensors file, kept under `name`."""
        specs = StagedFile.specs_of(tensors)
        header = _header(specs, metadata)
        staged = self.files.get(name)
        if staged is None or staged.specs != specs or len(header) > staged.data_start - 8:
            # Room for the header to grow (the learning rate in param_groups changes).
            staged = StagedFile(specs, header_room=2 * len(header) + _ALIGN)
            self.files[name] = staged
        staged.fill(tensors, header)
        self._cuda = self._cuda or any(t.is_cuda for t in tensors.values())
        return staged

    def stage_adapter(self, model: Any) -> StagedAdapter | None:
        """For a PEFT model (peft=lora): its adapter's tensors, as `PeftModel.save_pretrained`
        writes them, staged as the image of `adapter_model.safetensors`, and a copy of the
        adapter's config. None for any other model (and for several adapters at once, which
        are saved with save_pretrained from a copy)."""
        if not is_peft(model) or len(model.peft_config) != 1:
            return None
        import copy

        from peft import get_peft_model_state_dict

        name = model.active_adapter
        tensors = get_peft_model_state_dict(model, adapter_name=name)
        config = copy.deepcopy(model.peft_config[name])
        config.inference_mode = True  # as save_pretrained writes it
        staged = self.stage("adapter", {k: v.contiguous() for k, v in tensors.items()}, _PT)
        return StagedAdapter(staged, config)

    def ready(self) -> None:
        """Wait for device-to-host copies, so training may change the originals."""
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            self._cuda = False


class StagedAdapter:
    """A PEFT adapter staged for a checkpoint: its weights file's image and its config."""

    def __init__(self, weights: StagedFile, config: Any) -> None:
        self.weights, self.config = weights, config


_PT = {"format": "pt"}  # the metadata save_pretrained writes into a safetensors file


def weights_to_save(model: Any) -> dict[str, Any] | None:
    """The tensors `model.save_pretrained` would write (ignored keys and tied copies dropped,
    weight conversions reverted), for staging; None for a model whose save does more than write
    them (quantized, adapters, remote code, offloaded or sharded): that one is saved with
    save_pretrained from a plain copy."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # another transformers layout: take the general path
        return None
    special = (
        is_peft(model)
        or getattr(model, "hf_quantizer", None) is not None
        or getattr(model, "_hf_peft_config_loaded", False)
        or getattr(model.config, "distributed_config", None) is not None
        or getattr(model, "hf_device_map", None) is not None
        or model.is_remote_code()
    )
    if special:
        return None
    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or []:
        state.pop(key, None)
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))
    return {k: v.contiguous() for k, v in state.items()}


def save_weights(
    model: Any, weights: StagedFile | StagedAdapter | dict[str, Any], directory: Path
) -> dict[str, str]:
    """What save_pretrained writes: config, generation config and `model.safetensors` (from the
    staged image); for a PEFT model `adapter_config.json` and `adapter_model.safetensors`; or
    save_pretrained itself for a model `weights_to_save` declined."""
    if isinstance(weights, StagedAdapter):
        weights.config.save_pretrained(directory)
        return {ADAPTER: weights.weights.write(directory / ADAPTER)}
    if not isinstance(weights, StagedFile):
        model.save_pretrained(directory, state_dict=dict(weights))
        return {}
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    return {"model.safetensors": weights.write(directory / "model.safetensors")}


def save_optimizer(staged: StagedFile | dict[str, Any], directory: Path) -> dict[str, str]:
    """Write what `Snapshot.stage_optimizer` staged; returns {file name: xxh3_128} for the
    files whose checksum is already known."""
    if isinstance(staged, StagedFile):
        return {OPTIMIZER: staged.write(directory / OPTIMIZER)}
    import torch

    torch.save(staged, directory / "optimizer.pt")
    return {}


def load_optimizer(directory: Path) -> dict[str, Any]:
    from safetensors import safe_open

    state: dict[int, dict[str, Any]] = {}
    with safe_open(directory / OPTIMIZER, framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = f.get_tensor(key)
    for key, value in json.loads(metadata["plain_state"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:  # JSON turned tuples (betas) into lists
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


def save_scheduler(state: dict[str, Any], directory: Path) -> None:
    """The LR scheduler's state dict as JSON (Trainer's `scheduler.pt` when it is not JSON)."""
    try:
        text = json.dumps(state)
    except TypeError:
        import torch

        torch.save(state, directory / "scheduler.pt")
        return
    (directory / SCHEDULER).write_text(text, encoding="utf-8")


def load_scheduler(directory: Path) -> dict[str, Any]:
    if not (directory / SCHEDULER).is_file():
        import torch

        return torch.load(directory / "scheduler.pt", weights_only=True)
    return json.loads((directory / SCHEDULER).read_text(encoding="utf-8"))
