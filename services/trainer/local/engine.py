"""The local training loop (torch + peft): one loop for every task, crash-safe and controllable.

What the loop guarantees, whatever the task (see tasks.py for what differs per task):
- Seeded and reproducible: batch order for epoch e is a permutation drawn from (seed, e), the torch
  RNG (dropout) is saved in every checkpoint, so a resumed run takes the same steps an unbroken
  one would have taken and ends with the same adapter.
- Checkpoints are atomic (D5): written to a temporary file, fsynced, renamed, the directory
  fsynced, then the `LATEST` pointer is replaced the same way. A crash at any instant leaves either
  the previous checkpoint or the new one, never a torn file; a checkpoint whose sha256 does not
  match its pointer is skipped for the one before it.
- Mid-training evaluation every `eval_interval` steps; the best evaluation's trainable weights are
  kept (atomically, as `best.pt`) and exported at the end; early stopping after `patience`
  evaluations without an improvement of at least `min_delta`.
- NaN/inf loss, or a loss `divergence_factor` times the mean of the first losses, stops the run as
  diverged. Cancel and pause are honoured between steps; a pause writes a checkpoint first.
- Progress is reported at most every `progress_every_s` seconds (and at the last step).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.trainer.recipes import Recipe

LATEST = "LATEST"
BEST = "best.pt"
KEEP_CHECKPOINTS = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; nothing from this run is worth exporting."""


class TrainingCancelled(RuntimeError):
    """A cancel command arrived; the last checkpoint stays on disk for the audit trail."""


class TrainingTimedOut(RuntimeError):
    """The run passed its deadline; its last checkpoint stays, so a retry resumes from there."""


@dataclass(frozen=True)
class Progress:
    step: int
    max_steps: int
    epoch: float
    loss: float
    learning_rate: float
    examples_per_s: float
    eta_s: float
    eval_loss: float | None = None


@dataclass(frozen=True)
class Checkpointed:
    step: int
    max_steps: int
    epoch: float
    metric_name: str | None
    metric: float | None
    eval_loss: float | None
    is_best: bool
    path: Path
    sha256: str


@dataclass(frozen=True)
class EvalResult:
    metric_name: str
    metric: float          # higher is better
    eval_loss: float


@dataclass(frozen=True)
class TrainOutcome:
    adapter_dir: Path
    steps: int              # optimizer steps done in all (including those before a resume)
    max_steps: int
    best_step: int | None
    best_metric: float | None
    metric_name: str | None
    final_loss: float
    examples_per_s: float   # of this process's steps (a resume does not count the steps it skipped)
    wall_s: float
    stopped_early: bool
    resumed_from_step: int | None
    trainable_params: int
    total_params: int


class Control:
    """Cancel / pause / resume, set from the service's event loop, read by the training thread."""

    def __init__(self, deadline: float | None = None) -> None:
        self._cancelled = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self.requested_by: str | None = None
        self.deadline = deadline  # time.monotonic() value after which training stops as timed out
        # Pause/resume state changes so far (a pause of a paused run, a resume of a running one: no change).
        # Commands reach every trainer process in stream order, so each process counts the same: the
        # counter identifies a transition deterministically, e.g. in the ids of training.paused/resumed.
        self.transitions = 0

    def cancel(self, requested_by: str = "unknown") -> None:
        self.requested_by = requested_by
        self._cancelled.set()
        self._running.set()  # a paused loop wakes up to notice

    def pause(self, requested_by: str = "unknown") -> None:
        with self._lock:
            self.requested_by = requested_by
            if self._running.is_set():
                self.transitions += 1
            self._running.clear()

    def resume(self, requested_by: str = "unknown") -> None:
        with self._lock:
            self.requested_by = requested_by
            if not self._running.is_set():
                self.transitions += 1
            self._running.set()

    def pause_state(self) -> tuple[bool, int, str | None]:
        """(paused, transitions, requested_by), read together."""
        with self._lock:
            return not self._running.is_set(), self.transitions, self.requested_by

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, poll_s: float = 0.2) -> None:
        while not self._running.wait(poll_s):
            pass

    @property
    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@dataclass
class Callbacks:
    on_progress: Callable[[Progress], None] | None = None
    on_checkpoint: Callable[[Checkpointed], None] | None = None
    on_pause: Callable[[int], None] | None = None
    on_resume: Callable[[int], None] | None = None
    on_warning: Callable[[str, str], None] | None = None  # (reason_code, message)


# --- atomic files ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """write, fsync, rename, fsync the directory: the file is either the old one or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_bytes(obj: Any) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(work_dir: Path, step: int, state: dict) -> tuple[Path, str]:
    """Write checkpoint `step` atomically, point LATEST at it, keep the newest KEEP_CHECKPOINTS."""
    work_dir.mkdir(parents=True, exist_ok=True)
    data = _torch_bytes(state)
    digest = hashlib.sha256(data).hexdigest()
    path = work_dir / f"ckpt-{step:07d}.pt"
    atomic_write_bytes(path, data)
    atomic_write_bytes(work_dir / LATEST, json.dumps({"step": step, "file": path.name, "sha256": digest}).encode())
    for old in sorted(work_dir.glob("ckpt-*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path, digest


def load_latest_checkpoint(work_dir: Path, warn: Callable[[str, str], None] | None = None) -> dict | None:
    """The newest readable checkpoint: LATEST's file if its sha256 matches, else the ones before it."""
    import torch

    if not work_dir.is_dir():
        return None
    pointer: dict = {}
    try:
        pointer = json.loads((work_dir / LATEST).read_text())
    except (OSError, ValueError):
        pass
    candidates = sorted(work_dir.glob("ckpt-*.pt"), reverse=True)
    for path in candidates:
        data = path.read_bytes()
        if path.name == pointer.get("file") and hashlib.sha256(data).hexdigest() != pointer.get("sha256"):
            if warn:
                warn("training.checkpoint_unreadable", f"{path.name} does not match its sha256 in LATEST; using an older one")
            continue
        try:
            import io

            return torch.load(io.BytesIO(data), weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file: fall back to the one before
            if warn:
                warn("training.checkpoint_unreadable", f"{path.name} could not be read ({type(exc).__name__}: {exc})")
    return None


# --- the loop -------------------------------------------------------------------------------


def lr_multiplier(step: int, max_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 then linear decay to 0 at max_steps; `step` counts optimizer steps done."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Rows of optimizer step `step` (1-based): epoch e is a permutation drawn from (seed, e), so any
    step's batch can be recomputed after a crash without replaying the ones before it."""
    per_epoch = -(-n // batch_size)
    epoch, pos = divmod(step - 1, per_epoch)
    return list(_epoch_order(n, seed, epoch)[pos * batch_size : (pos + 1) * batch_size])


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One permutation per epoch, drawn once (8 ms for 36k rows: too much to redo every step)."""
    import torch

    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_depth(name: str) -> int | None:
    """0 for the embeddings, i + 1 for encoder layer i, None for anything above (the head)."""
    if ".embeddings." in f".{name}" or name.startswith("embeddings."):
        return 0
    m = _LAYER.search(name)
    return int(m.group(1)) + 1 if m else None


def param_groups(named: list[tuple[str, Any]], recipe: Recipe) -> list[dict]:
    """AdamW parameter groups: one rate for all (layer_lr_decay 1), or layer-wise: the head and the top
    layer at learning_rate, each layer below layer_lr_decay times the one above, the embeddings lowest."""
    if recipe.layer_lr_decay >= 1.0:
        return [{"params": [p for _, p in named]}]
    depths = {n: layer_depth(n) for n, _ in named}
    top = max((d for d in depths.values() if d is not None), default=0)
    groups: dict[int, list] = {}
    for n, p in named:
        d = depths[n]
        groups.setdefault(top if d is None else d, []).append(p)
    return [{"params": ps, "lr": recipe.learning_rate * recipe.layer_lr_decay ** (top - d)}
            for d, ps in sorted(groups.items(), reverse=True)]  # the head's rate first (progress reports it)


@dataclass
class _State:
    step: int = 0
    examples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    loss_reference: list[float] = field(default_factory=list)
    last_eval_loss: float | None = None
    # kept in the checkpoint so that a resume after the last step (a redelivery, or the tuning winner's
    # checkpoint taken over as the final model) reports the loss it ended with and does not train past an
    # early stop
    last_loss: float | None = None
    stopped_early: bool = False


def train(
    task,
    recipe: Recipe,
    train_rows: list[dict],
    eval_rows: list[dict],
    work_dir: Path,
    out_dir: Path,
    *,
    control: Control | None = None,
    callbacks: Callbacks | None = None,
    progress_every_s: float = 2.0,
) -> TrainOutcome:
    """Train `task` per `recipe`, checkpointing into work_dir (resuming from it if it holds a
    checkpoint), and save the best adapter to out_dir. Blocking and CPU/GPU-bound."""
    import torch

    if not train_rows:
        raise ValueError("no training rows")
    task.validate(train_rows, eval_rows)
    control = control or Control()
    cb = callbacks or Callbacks()
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    started = time.perf_counter()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = task.build_model(recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    trainable_count = sum(p.numel() for p in params)
    total_count = sum(p.numel() for p in model.parameters())

    train_enc = task.encode(train_rows)
    eval_enc = task.encode(eval_rows) if eval_rows else None
    n = len(train_rows)
    batch_size = min(recipe.batch_size, n)
    max_steps = recipe.steps_for(n)
    eval_every = recipe.eval_interval(n)
    ckpt_every = recipe.checkpoint_interval(n)
    warmup = int(max_steps * recipe.warmup_ratio)

    optimizer = torch.optim.AdamW(param_groups(trainable, recipe), lr=recipe.learning_rate,
                                  weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, max_steps, warmup))

    st = _State()
    resumed_from: int | None = None
    saved = load_latest_checkpoint(work_dir, cb.on_warning)
    if saved is not None and saved.get("max_steps") == max_steps and saved.get("recipe") == recipe.model_dump(mode="json"):
        model.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        st = _State(**saved["state"])
        resumed_from = st.step
    elif saved is not None and cb.on_warning:
        cb.on_warning("training.checkpoint_unreadable",
                      "the checkpoint in the work directory belongs to another recipe or data size; starting from step 0")

    def trainable_state() -> dict:
        return {name: p.detach().to("cpu").clone() for name, p in trainable}

    def checkpoint(ev: EvalResult | None, is_best: bool) -> None:
        state = {
            "step": st.step, "max_steps": max_steps, "recipe": recipe.model_dump(mode="json"),
            "trainable": trainable_state(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "state": st.__dict__.copy(), "torch_rng": torch.get_rng_state(),
        }
        path, digest = save_checkpoint(work_dir, st.step, state)
        if cb.on_checkpoint:
            cb.on_checkpoint(Checkpointed(
                step=st.step, max_steps=max_steps, epoch=st.examples_seen / n,
                metric_name=ev.metric_name if ev else None, metric=ev.metric if ev else None,
                eval_loss=ev.eval_loss if ev else None, is_best=is_best, path=path, sha256=digest,
            ))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        if saved is not None and resumed_from is not None:
            torch.set_rng_state(saved["torch_rng"])
        model.train()
        loop_started = time.perf_counter()
        steps_here = 0
        examples_here = 0
        last_report = 0.0
        loss_value = st.last_loss if st.last_loss is not None else float("nan")
        while st.step < max_steps and not st.stopped_early:
            if control.cancelled:
                raise TrainingCancelled(f"cancelled by {control.requested_by} at step {st.step}/{max_steps}")
            if control.timed_out:
                raise TrainingTimedOut(f"the time limit passed at step {st.step}/{max_steps}")
            if control.paused:
                checkpoint(None, False)
                if cb.on_pause:
                    cb.on_pause(st.step)
                control.wait_while_paused()
                if control.cancelled:
                    raise TrainingCancelled(f"cancelled by {control.requested_by} at step {st.step}/{max_steps}")
                if cb.on_resume:
                    cb.on_resume(st.step)
            idx = batch_indices(st.step + 1, n, batch_size, recipe.seed)
            batch = {k: v.to(device) for k, v in task.collate(train_enc, idx).items()}
            loss = model(**batch).loss
            loss_value = st.last_loss = float(loss.detach())
            _check_divergence(loss_value, st, recipe)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            st.step += 1
            st.examples_seen += len(idx)
            steps_here += 1
            examples_here += len(idx)

            ev: EvalResult | None = None
            is_best = False
            if eval_enc is not None and (st.step % eval_every == 0 or st.step == max_steps):
                ev = task.evaluate(model, eval_enc, recipe)
                model.train()
                st.last_eval_loss = ev.eval_loss
                if st.best_metric is None or ev.metric > st.best_metric + recipe.min_delta:
                    st.best_metric, st.best_step, st.evals_without_improvement = ev.metric, st.step, 0
                    is_best = True
                    atomic_write_bytes(work_dir / BEST, _torch_bytes({"step": st.step, "trainable": trainable_state()}))
                else:
                    st.evals_without_improvement += 1
                # patience running out at the schedule's last step stops nothing: the schedule is complete
                if (recipe.patience is not None and st.evals_without_improvement >= recipe.patience
                        and st.step < max_steps):
                    st.stopped_early = True

            now = time.perf_counter()
            if cb.on_progress and (now - last_report >= progress_every_s or st.step == max_steps or st.stopped_early):
                last_report = now
                elapsed = now - loop_started
                rate = examples_here / elapsed if elapsed > 0 else 0.0
                cb.on_progress(Progress(
                    step=st.step, max_steps=max_steps, epoch=st.examples_seen / n, loss=loss_value,
                    learning_rate=scheduler.get_last_lr()[0], examples_per_s=rate,
                    eta_s=elapsed / steps_here * (max_steps - st.step), eval_loss=st.last_eval_loss,
                ))
            if ev is not None or st.step % ckpt_every == 0 or st.step == max_steps or st.stopped_early:
                checkpoint(ev, is_best)
            if st.stopped_early:
                break
        loop_s = time.perf_counter() - loop_started

    if st.best_step is not None:
        best = torch.load(work_dir / BEST, weights_only=False)
        model.load_state_dict(best["trainable"], strict=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    task.write_metadata(out_dir, recipe)
    return TrainOutcome(
        adapter_dir=out_dir, steps=st.step, max_steps=max_steps, best_step=st.best_step, best_metric=st.best_metric,
        metric_name=task.metric_name, final_loss=loss_value,
        examples_per_s=examples_here / loop_s if loop_s > 0 else 0.0, wall_s=time.perf_counter() - started,
        stopped_early=st.stopped_early, resumed_from_step=resumed_from,
        trainable_params=trainable_count, total_params=total_count,
    )


def _check_divergence(loss: float, st: _State, recipe: Recipe) -> None:
    """NaN/inf, or a loss over `divergence_factor` times the first step's loss. The first loss is
    taken before any update, so it is the untrained model's level (about log K for K classes); a
    healthy run stays below it, an exploding one passes it within a few steps. (A reference that
    averages several early steps would already contain the explosion.)"""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss became {loss} at step {st.step + 1} (learning_rate={recipe.learning_rate})")
    if not st.loss_reference:
        st.loss_reference.append(loss)
        return
    reference = st.loss_reference[0]
    if reference > 0 and loss > recipe.divergence_factor * reference:
        raise TrainingDiverged(
            f"loss exploded to {loss:.4g} at step {st.step + 1}, over {recipe.divergence_factor:g}x the first "
            f"step's loss ({reference:.4g}); lower learning_rate ({recipe.learning_rate:g})"
        )
