"""The trainer's small parts, each its own concern: the EMA, the resumable data order, the log trimming on
resume, graceful Ctrl-C, the indexed dataset wrapper and the ``Accelerator`` set-up."""

from __future__ import annotations

import json
import signal
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vdeploy.data import Dataset


def num_to_groups(num: int, divisor: int) -> list[int]:
    """``num`` split into chunks of at most ``divisor`` (the seed's helper)."""
    groups, remainder = divmod(num, divisor)
    return [divisor] * groups + ([remainder] if remainder > 0 else [])


class EMA:
    """Exponential moving average of parameters: ``ma = beta * ma + (1 - beta) * current`` (the seed's)."""

    def __init__(self, beta: float):
        self.beta = beta

    @torch.no_grad()
    def update_model_average(self, ma_model: nn.Module, current_model: nn.Module) -> None:
        for current, ma in zip(current_model.parameters(), ma_model.parameters()):
            ma.data = self.update_average(ma.data, current.data)

    def update_average(self, old, new):
        if old is None:
            return new
        return old * self.beta + (1 - self.beta) * new


class DataOrder:
    """An endless, deterministic stream of sample indices: a seeded permutation per epoch.

    Its whole state is ``(seed, consumed)``, so a resumed run continues the same order. Each
    step takes ``batch_size * num_processes`` indices; process ``rank`` keeps its slice.
    """

    def __init__(self, n: int, seed: int = 0, consumed: int = 0):
        self.n, self.seed, self.consumed = n, int(seed), int(consumed)
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def take(self, count: int) -> list[int]:
        out = []
        for k in range(self.consumed, self.consumed + count):
            out.append(int(self._permutation(k // self.n)[k % self.n]))
        self.consumed += count
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "consumed": self.consumed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("n", self.n)) != self.n:
            warnings.warn(
                f"the dataset has {self.n} videos but the checkpoint's data order was for {state['n']}: "
                "the order continues, but not the one the first run would have followed",
                stacklevel=2,
            )
        self.seed, self.consumed = int(state["seed"]), int(state["consumed"])
        self._epoch = -1


def _log_lines_until(path: Path, step: int) -> list[str]:
    """The lines of a ``log.jsonl`` up to ``step`` (a crashed run may have logged past its checkpoint)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


class _GracefulStop:
    """The first Ctrl-C asks the loop to stop at the next step boundary (and save); a second one
    interrupts at once. Only in the main thread, where signal handlers can be set."""

    def __init__(self):
        self.requested = False
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving model-last.pt (Ctrl-C again to abort now)", file=sys.stderr)

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i], i


def _make_accelerator(mixed_precision: str | None, cpu: bool):
    """An ``Accelerator`` for this process, alone or one of those ``torchrun`` / ``accelerate launch``
    started (gloo on the CPU, NCCL on CUDA). ``mixed_precision`` None: accelerate's launch/config setting."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', not {mixed_precision!r}")
    use_cuda = torch.cuda.is_available() and not cpu
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        # a second trainer in the same single process (tests, notebooks) may want other settings
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not use_cuda)
