"""Local trainer throughput: `services.trainer.local.engine.train` against a bare transformers + peft
loop, same model, same data, same steps, measured in the same process.

    python -m bench.trainer [--steps 40] [--warmup 5] [--rounds 3] [--rows 320]

Both sides: all-MiniLM-L6-v2 with the `seqcls-lora-minilm` recipe's LoRA (r, alpha, dropout,
target_modules; the classifier head trained in full via modules_to_save), batch 16, max_length 128
with texts that fill it (real rows of ../shared/datasets: Apache JIRA bug reports, else NLBSE'24
issues; every row has >= 128 tokens, so every batch is 16 x 128 whatever its order), AdamW with the
recipe's rate and weight decay, clip at 1.0, linear warmup/decay, the same seed and torch threads.

- ours: `train()` on the rows, no eval rows (mid-training evaluation is off) and max_steps =
  warmup + steps + 1, so the unconditional checkpoint at the last step falls after the window.
  Steps are timed from the start of step warmup+1 to the start of step warmup+steps+1 (the task's
  collate is wrapped to take the timestamps), so each measured step includes all the loop's
  bookkeeping: batch indices, padding, divergence check, scheduler, progress callback (the
  service's 2 s interval), checkpoint decision. Two variants:
    `trainer_examples_per_s`     checkpointing off inside the window (checkpoint_every_steps=10**9);
    `trainer_examples_per_s_ckpt`   checkpointing at the recipe's default interval (every evaluation
                                   interval = once per epoch: with --rows 320, steps 20 and 40).
- baseline: the loop an engineer writes by hand: seeded shuffle per epoch, tokenizer(batch,
  padding=True, truncation=True, max_length=128), forward, backward, clip_grad_norm_, AdamW step,
  get_linear_schedule_with_warmup step, zero_grad.

The runs alternate (ours, bare, ours+ckpt) `--rounds` times; each figure is the median examples/s
over its rounds and the ratio is median(ours) / median(bare). Target ratio >= 0.95. The machine this
runs on is usually shared, so two noise-robust companions are reported beside it: the pooled-step
ratio (batch / median step time over all rounds' steps, each side) and a lock-step pass per variant
(ours in a thread, bare in the main thread, one step each in turn, each step timed without its wait:
a burst of outside load lands on neighbouring steps of both sides alike).
Writes bench/results/trainer.json and bench/results/trainer_ckpt.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = ROOT.parent / "shared" / "datasets"
JIRA = DATASETS / "apache_jira_bugs" / "bugs_train_val.jsonl"
NLBSE = DATASETS / "nlbse24_issue_report_classification" / "issues_train.csv"
RECIPE = "seqcls-lora-minilm"
BATCH, MAX_LENGTH, SEED = 16, 128, 13
NEVER = 10**9
TARGET = 0.95


def _raw_rows():
    if JIRA.exists():
        with open(JIRA, encoding="utf-8") as f:
            for line in f:
                o = json.loads(line)
                yield "\n\n".join(x for x in (o.get("summary"), o.get("description")) if x), o["priority"]
    elif NLBSE.exists():
        csv.field_size_limit(sys.maxsize)
        with open(NLBSE, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                yield r["title"] + " " + r["body"], r["label"]


def load_rows(tokenizer, n: int) -> tuple[list[dict], str]:
    """The first n real rows whose text fills max_length tokens."""
    rows = []
    for text, label in _raw_rows():
        if len(tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]) == MAX_LENGTH:
            rows.append({"row_number": len(rows) + 1, "text": text, "label": label})
            if len(rows) == n:
                break
    return rows, (JIRA if JIRA.exists() else NLBSE).name


def recipe_for(total_steps: int, checkpoint_every: int | None):
    from services.trainer.recipes import resolve_recipe

    return resolve_recipe(RECIPE, "single_label_classification", {
        "max_steps": total_steps, "batch_size": BATCH, "max_length": MAX_LENGTH, "seed": SEED, "patience": None,
        "checkpoint_every_steps": checkpoint_every})


class Turns:
    """Lock-step for the paired measurement: ours and bare take one step each in turn, each timed
    without the time it waits, so a burst of load from another process hits both sides alike."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.who = "ours"
        self.done: set[str] = set()

    @staticmethod
    def _other(me: str) -> str:
        return "bare" if me == "ours" else "ours"

    def wait(self, me: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.who == me or self._other(me) in self.done)

    def give(self, me: str) -> None:
        with self.cond:
            self.who = self._other(me)
            self.cond.notify_all()

    def finish(self, me: str) -> None:
        with self.cond:
            self.done.add(me)
            self.who = self._other(me)
            self.cond.notify_all()


def _busy_s() -> float:
    """CPU seconds all processes on the machine have been busy (from /proc/stat; 0 where absent)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _stamp() -> tuple[float, float, float]:
    """(wall, this process's CPU, the whole machine's busy CPU) seconds."""
    return time.perf_counter(), time.process_time(), _busy_s()


def _steps(starts: list[tuple], ends: list[tuple], warmup: int, steps: int) -> dict:
    pairs = list(zip(starts[warmup:warmup + steps], ends[warmup:warmup + steps]))
    assert len(pairs) == steps, (len(starts), len(ends))
    step_s = [e[0] - b[0] for b, e in pairs]
    cpu_s = [e[1] - b[1] for b, e in pairs]
    outside = sum((e[2] - b[2]) - (e[1] - b[1]) for b, e in pairs)  # other processes' CPU during our steps
    return {"examples_per_s": steps * BATCH / sum(step_s), "window_s": sum(step_s),
            "step_s_median": statistics.median(step_s), "step_s": [round(t, 3) for t in step_s],
            "cpu_s_per_step_median": round(statistics.median(cpu_s), 3),
            "outside_load": round(max(0.0, outside) / (sum(step_s) * (os.cpu_count() or 1)), 3)}


def run_ours(rows: list[dict], labels: list[str], warmup: int, steps: int, checkpoint_every: int | None,
             turns: Turns | None = None) -> dict:
    from services.trainer.local import engine
    from services.trainer.local.engine import Callbacks, train
    from services.trainer.local.tasks import SequenceClassification

    class TimedTask(SequenceClassification):
        """Step k starts when collate is called for it (call k: no eval rows, nothing else collates)
        and ends when collate is called for step k + 1."""

        def collate(self, enc, idx):
            now = _stamp()
            if self.starts:
                self.ends.append(now)
                if turns is not None:
                    turns.give("ours")
            if turns is not None:
                turns.wait("ours")
                now = _stamp()
            self.starts.append(now)
            return super().collate(enc, idx)

    task = TimedTask(labels)
    task.starts, task.ends = [], []
    recipe = recipe_for(warmup + steps + 1, checkpoint_every)
    saves: list[tuple[int, float]] = []
    real_save = engine.save_checkpoint

    def timed_save(work_dir, step, state):
        t0 = time.perf_counter()
        out = real_save(work_dir, step, state)
        saves.append((step, time.perf_counter() - t0))
        return out

    progress: list[int] = []
    checkpoints: list[int] = []
    cb = Callbacks(on_progress=lambda p: progress.append(p.step), on_checkpoint=lambda c: checkpoints.append(c.step))
    engine.save_checkpoint = timed_save
    try:
        with tempfile.TemporaryDirectory(prefix="tuneline-bench-trainer-") as tmp:
            outcome = train(task, recipe, rows, [], Path(tmp) / "work", Path(tmp) / "adapter", callbacks=cb,
                            progress_every_s=2.0)
    finally:
        engine.save_checkpoint = real_save
        if turns is not None:
            turns.finish("ours")
    in_window = [(st, round(d, 4)) for st, d in saves if warmup < st <= warmup + steps]
    return {**_steps(task.starts, task.ends, warmup, steps), "checkpoints_in_window": in_window,
            "progress_callbacks": len(progress), "final_loss": outcome.final_loss,
            "engine_examples_per_s": outcome.examples_per_s}


def run_bare(rows: list[dict], labels: list[str], warmup: int, steps: int, turns: Turns | None = None) -> dict:
    """The hand-written transformers + peft loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from services.common.encoder_classifier import HEAD_MODULES, build_encoder_classifier, lora_task_type
    from services.common.models import resolve_base_model

    r = recipe_for(warmup + steps, None)
    path = resolve_base_model(r.base_model)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the recipe's model (its head: transformers' classifier or the mean-pooled one), as the trainer builds it
    model = build_encoder_classifier(path, labels, pooling=r.pooling)
    model = get_peft_model(model, LoraConfig(
        task_type=lora_task_type(r.pooling), r=r.lora_r, lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout,
        target_modules=list(r.target_modules), modules_to_save=HEAD_MODULES[r.pooling]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    total = warmup + steps
    optimizer = torch.optim.AdamW(params, lr=r.learning_rate, weight_decay=r.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * r.warmup_ratio), total)
    texts = [x["text"] for x in rows]
    y = [labels.index(x["label"]) for x in rows]
    n, per_epoch = len(rows), -(-len(rows) // BATCH)
    model.train()
    torch.manual_seed(SEED)
    starts, ends, loss = [], [], None
    try:
        for step in range(total):
            if turns is not None:
                turns.wait("bare")
            starts.append(_stamp())
            epoch, pos = divmod(step, per_epoch)
            if pos == 0:  # a seeded shuffle per epoch
                order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch)).tolist()
            idx = order[pos * BATCH:(pos + 1) * BATCH]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(device)
            loss = model(**batch, labels=torch.tensor([y[i] for i in idx], device=device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, r.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(_stamp())
            if turns is not None:
                turns.give("bare")
    finally:
        if turns is not None:
            turns.finish("bare")
    return {**_steps(starts, ends, warmup, steps), "final_loss": float(loss.detach())}


def run_paired(rows: list[dict], labels: list[str], warmup: int, steps: int, checkpoint_every: int | None):
    """ours (a thread) and bare (this thread) in lock-step, one step each in turn."""
    from concurrent.futures import ThreadPoolExecutor

    turns = Turns()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(run_ours, rows, labels, warmup, steps, checkpoint_every, turns)
        try:
            bare = run_bare(rows, labels, warmup, steps, turns)
        finally:
            ours = fut.result()
    return ours, bare


def _median_ms(fn, reps: int = 200) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def overheads(tokenizer, rows: list[dict], labels: list[str]) -> dict:
    """Per-step costs outside forward/backward, each alone (median of repeated calls, milliseconds)."""
    import torch

    from services.trainer.local.engine import _check_divergence, _State, batch_indices
    from services.trainer.local.tasks import SequenceClassification

    task = SequenceClassification(labels)
    task.tokenizer, task.recipe = tokenizer, recipe_for(10, None)
    enc = task.encode(rows)
    idx = batch_indices(1, len(rows), BATCH, SEED)
    texts = [rows[i]["text"] for i in idx]
    st = _State(loss_reference=[1.0])
    loss = torch.tensor(1.0)
    return {
        "ours_collate_pad_16x128": _median_ms(lambda: task.collate(enc, idx)),
        f"ours_batch_indices_n{len(rows)}": _median_ms(lambda: batch_indices(7, len(rows), BATCH, SEED)),
        "ours_batch_indices_n36526": _median_ms(lambda: batch_indices(7, 36526, BATCH, SEED)),
        "ours_divergence_check": _median_ms(lambda: _check_divergence(float(loss.detach()), st, task.recipe)),
        "bare_tokenize_batch_16": _median_ms(lambda: tokenizer(texts, padding=True, truncation=True,
                                                               max_length=MAX_LENGTH, return_tensors="pt"), 50),
    }


def _line(kind: str, res: dict, bare: dict | None = None) -> str:
    out = (f"{kind:<9} {res['examples_per_s']:6.2f} examples/s (median step {res['step_s_median']:.3f}s, cpu "
           f"{res['cpu_s_per_step_median']:.3f}s, outside load {res['outside_load']:.0%}")
    if res.get("checkpoints_in_window"):
        out += f", checkpoint saves in window (step, s) {res['checkpoints_in_window']}"
    if bare is not None:
        out += (f") vs bare {bare['examples_per_s']:6.2f} (median step {bare['step_s_median']:.3f}s, outside load "
                f"{bare['outside_load']:.0%}")
    return out + ")"


def measure(steps: int, warmup: int, rounds: int, n_rows: int, mode: str) -> list[dict] | None:
    import torch
    from transformers import AutoTokenizer

    from services.common.models import resolve_base_model

    torch.set_num_threads(os.cpu_count() or 1)  # the same for every run: one process, set once
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("all-MiniLM-L6-v2"))
    rows, source = load_rows(tokenizer, n_rows)
    if len(rows) < n_rows:
        print(f"skipping trainer bench: needs {n_rows} rows of >= {MAX_LENGTH} tokens from {JIRA} or {NLBSE} "
              f"(found {len(rows)}; ../shared/datasets is not on this machine?)")
        return None
    labels = sorted({r["label"] for r in rows})
    verbose = bool(os.environ.get("BENCH_VERBOSE"))
    variants = {"ours": NEVER, "ours_ckpt": None}
    # paired[kind] = [(ours, bare), ...] per round; runs[kind] = [result, ...] per round
    paired: dict[str, list[tuple[dict, dict]]] = {k: [] for k in variants}
    runs: dict[str, list[dict]] = {k: [] for k in (*variants, "bare")}
    for i in range(rounds):
        if mode in ("paired", "both"):
            for kind, every in variants.items():
                ours, bare = run_paired(rows, labels, warmup, steps, every)
                paired[kind].append((ours, bare))
                print(f"  round {i + 1} lock-step {_line(kind, ours, bare)}", flush=True)
                if verbose:
                    print(f"    step seconds ours {ours['step_s']}\n    step seconds bare {bare['step_s']}")
        if mode in ("runs", "both"):
            for kind in ("ours", "bare", "ours_ckpt"):
                res = (run_bare(rows, labels, warmup, steps) if kind == "bare"
                       else run_ours(rows, labels, warmup, steps, variants[kind]))
                runs[kind].append(res)
                print(f"  round {i + 1} run       {_line(kind, res)}", flush=True)
                if verbose:
                    print(f"    step seconds {res['step_s']}")

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    common = {"unit": "examples/s", "target": TARGET, "mode": mode, "rounds": rounds, "steps": steps,
              "warmup_steps": warmup, "batch_size": BATCH, "max_length": MAX_LENGTH, "rows": n_rows, "source": source,
              "labels": labels, "torch_threads": torch.get_num_threads(),
              "overheads_ms": overheads(tokenizer, rows, labels),
              "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()}
    out = []
    for kind, name, note in (
        ("ours", "trainer_examples_per_s", "eval off (no eval rows), checkpointing off inside the window"),
        ("ours_ckpt", "trainer_examples_per_s_ckpt", "eval off, checkpointing at the recipe default (once per epoch)"),
    ):
        r: dict = {"name": name, **common, "variant": note}
        if runs[kind]:
            ours_eps = [x["examples_per_s"] for x in runs[kind]]
            bare_eps = [x["examples_per_s"] for x in runs["bare"]]
            pooled = BATCH / statistics.median(t for x in runs[kind] for t in x["step_s"])
            pooled_bare = BATCH / statistics.median(t for x in runs["bare"] for t in x["step_s"])
            r["runs"] = {
                "figure": med(ours_eps), "baseline": med(bare_eps), "ratio": round(med(ours_eps) / med(bare_eps), 3),
                "ours": [round(x, 3) for x in ours_eps], "bare": [round(x, 3) for x in bare_eps],
                "per_round_ratio": [round(a / b, 3) for a, b in zip(ours_eps, bare_eps)],
                "pooled_step_ratio": round(pooled / pooled_bare, 3),
                "outside_load": [x["outside_load"] for x in runs[kind]],
                "bare_outside_load": [x["outside_load"] for x in runs["bare"]],
                "checkpoints_in_window": [x["checkpoints_in_window"] for x in runs[kind]],
                "progress_callbacks": [x["progress_callbacks"] for x in runs[kind]],
                "step_s": [x["step_s"] for x in runs[kind]], "bare_step_s": [x["step_s"] for x in runs["bare"]]}
        if paired[kind]:
            ours_eps = [o["examples_per_s"] for o, _ in paired[kind]]
            bare_eps = [b["examples_per_s"] for _, b in paired[kind]]
            r["paired"] = {
                "figure": med(ours_eps), "baseline": med(bare_eps), "ratio": round(med(ours_eps) / med(bare_eps), 3),
                "ours": [round(x, 3) for x in ours_eps], "bare": [round(x, 3) for x in bare_eps],
                "per_round_ratio": [round(a / b, 3) for a, b in zip(ours_eps, bare_eps)],
                "median_step_pair_ratio": round(statistics.median(
                    b / a for o, bb in paired[kind] for a, b in zip(o["step_s"], bb["step_s"])), 3),
                "outside_load": [o["outside_load"] for o, _ in paired[kind]],
                "bare_outside_load": [b["outside_load"] for _, b in paired[kind]],
                "checkpoints_in_window": [o["checkpoints_in_window"] for o, _ in paired[kind]],
                "progress_callbacks": [o["progress_callbacks"] for o, _ in paired[kind]],
                "step_s": [o["step_s"] for o, _ in paired[kind]], "bare_step_s": [b["step_s"] for _, b in paired[kind]]}
        head = r["paired"] if "paired" in r else r["runs"]
        r.update(figure=head["figure"], baseline=head["baseline"], ratio=head["ratio"],
                 figure_from="lock-step pairs" if "paired" in r else "alternating runs")
        out.append(r)
    return out


def print_table(results: list[dict]) -> None:
    print(f"{'benchmark':<28} {'figure':>8} {'baseline':>9} {'unit':<11} {'ratio':>6}  target")
    for r in results:
        print(f"{r['name']:<28} {r['figure']:>8.2f} {r['baseline']:>9.2f} {r['unit']:<11} {r['ratio']:>6.3f}  "
              f">= {TARGET} {'ok' if r['ratio'] >= TARGET else 'MISSED'}   ({r['figure_from']}; {r['variant']})")
        for how in ("paired", "runs"):
            if how in r:
                x = r[how]
                print(f"  {how:<6}: medians {x['figure']} vs {x['baseline']} -> {x['ratio']}; ours {x['ours']}, bare "
                      f"{x['bare']}, per-round ratio {x['per_round_ratio']}, outside load {x['outside_load']} vs "
                      f"{x['bare_outside_load']}")
    print(f"  per-step costs outside forward/backward (ms): {results[0]['overheads_ms']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=320, help="rows to train on (320 = 20 steps per epoch)")
    ap.add_argument("--mode", choices=("paired", "runs", "both"), default="paired",
                    help="paired: lock-step ours/bare per round (the figure); runs: whole runs alternating "
                         "(ours, bare, ours+ckpt); both: the two, the figure from the pairs")
    a = ap.parse_args()
    t0 = time.perf_counter()
    results = measure(a.steps, a.warmup, a.rounds, a.rows, a.mode)
    if results is None:
        return
    print_table(results)
    print(f"trainer bench wall time: {time.perf_counter() - t0:.0f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r, file in zip(results, ("trainer.json", "trainer_ckpt.json")):
        (RESULTS / file).write_text(json.dumps(
            {k: r[k] for k in ("name", "figure", "unit", "baseline", "ratio")} | {"details": r}, indent=2) + "\n")


if __name__ == "__main__":
    main()
