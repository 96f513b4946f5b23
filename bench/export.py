"""Exported formats against PyTorch: inference examples/s, accuracy and max |logit diff| on the NLBSE'24
held-out rows, all measured in the same run.

    python -m bench.export [--repo facebook/react] [--epochs 2] [--rounds 3] [--all-repos] [--work DIR]

One all-MiniLM-L6-v2 classifier (the `seqcls-lora-minilm` recipe, `--epochs` passes, a minute or two on
this machine) is trained on one repository's train split after ingest and prep (bench/nlbse.py's
prep_repo: cleaning on, stratified split, eval_fraction 0.2, seed 13). The rows measured are that
repository's held-out (test) rows; `--all-repos` measures the held-out rows of all five (the same three
labels: the model is then scored on other repositories' rows too, which lowers its accuracy but not what
is compared). `--work DIR` keeps the training's checkpoints, so an interrupted benchmark resumes training.

The same held-out rows go through:
- PyTorch, PEFT: the adapter on its base, as the evaluator scores it (services/export/formats.py's
  reference: the logits the formats are compared with);
- PyTorch, merged: the LoRA merged into the encoder (the model every other format is written from);
- ONNX fp32 and ONNX int8 (onnxruntime dynamic quantisation), loaded fresh with onnxruntime's CPU provider.

Throughput is end to end per batch (tokenising included, the same tokenizer for all), batch 32, the same
thread count for torch and onnxruntime (all cores), one warm-up batch, and the variants interleaved over
`--rounds` rounds; the figure is each variant's median. Ratios are against PyTorch merged. The machine is
shared, so absolute examples/s move with its load; the ratios are measured side by side.
Writes bench/results/export.json; skips (exit 0) when the dataset is absent.
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

from bench.nlbse import DATA, RESULTS, SEED, load_repos, prep_repo

BATCH = 32


def throughput(run_batch, texts: list[str]) -> float:
    """Examples per second over all of `texts` in batches of BATCH (after one warm-up batch)."""
    run_batch(texts[:BATCH])
    t0 = time.perf_counter()
    for start in range(0, len(texts), BATCH):
        run_batch(texts[start:start + BATCH])
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="facebook/react", help="the repository whose train split trains the model")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--all-repos", action="store_true", help="measure the held-out rows of all five repositories")
    ap.add_argument("--work", type=Path, default=None, help="a folder for the training's checkpoints (resumable)")
    args = ap.parse_args()
    if not DATA.is_file():
        print(f"bench.export: skipped, {DATA} is absent (../shared/datasets/README.md)")
        return

    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer

    from services.common.models import resolve_base_model
    from services.export import formats as F
    from services.export.domain import build_adapter_export
    from services.trainer.local.engine import train
    from services.trainer.local.tasks import SequenceClassification
    from services.trainer.recipes import resolve_recipe

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    repos = load_repos()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        prepared = {repo: prep_repo(repo, rows, tmp) for repo, rows in repos.items()}
        p = prepared[args.repo]
        recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                                {"seed": SEED, "epochs": args.epochs, "patience": None})
        t0 = time.perf_counter()
        outcome = train(SequenceClassification(p["label_space"]), recipe, p["train"], [], args.work or tmp / "w",
                        tmp / "adapter")
        train_s = time.perf_counter() - t0
        held_out = [r for repo in prepared.values() for r in repo["eval"]] if args.all_repos else p["eval"]
        texts = [r["text"] for r in held_out]
        base_path = resolve_base_model(recipe.base_model)

        t0 = time.perf_counter()
        ref = F.load_reference(outcome.adapter_dir, base_path, held_out)
        out = tmp / "export"
        build_adapter_export(outcome.adapter_dir, out, run_id="bench", base_model=recipe.base_model, metrics={})
        outcomes = {o.format: o for o in F.write_formats(ref, ["onnx", "onnx-int8"], out,
                                                         adapter_dir=outcome.adapter_dir, max_accuracy_drop=1.0)}
        export_s = time.perf_counter() - t0
        for o in outcomes.values():
            if not o.shipped:
                sys.exit(f"bench.export: {o.format} did not ship: [{o.reason_code}] {o.message}")

        tok = AutoTokenizer.from_pretrained(base_path)
        max_length = recipe.max_length

        # PEFT: the evaluator's model (a fresh load of the adapter on its base)
        from peft import PeftModel

        from services.common.encoder_classifier import build_encoder_classifier

        peft_model = PeftModel.from_pretrained(
            build_encoder_classifier(base_path, p["label_space"], pooling=recipe.pooling), str(outcome.adapter_dir)).eval()
        merged = ref.merged

        def torch_runner(model):
            def run(batch):
                enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                with torch.inference_mode():
                    return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
            return run

        def onnx_runner(folder: Path):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(folder / F.ONNX_FILE), options, providers=["CPUExecutionProvider"])

            def run(batch):
                enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
                return session.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                                "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            return run

        runners = {"pytorch (peft)": torch_runner(peft_model), "pytorch (merged)": torch_runner(merged),
                   "onnx fp32": onnx_runner(out / "onnx"), "onnx int8": onnx_runner(out / "onnx-int8")}
        speeds: dict[str, list[float]] = {k: [] for k in runners}
        seen: dict[str, list] = {k: [] for k in runners}  # the first round's logits, batch by batch

        def recording(name, run):
            def go(batch):
                out = run(batch)
                seen[name].append(out)
                return out
            return go

        for r in range(args.rounds):
            for name, run in runners.items():
                speeds[name].append(throughput(recording(name, run) if r == 0 else run, texts))

        # accuracy and logit diffs of every variant, from the same logits the speed runs produce
        ref_logits = np.concatenate(ref.logits)
        gold = [r["label"] for r in held_out]
        labels = ref.label_space()
        rows_out = {}
        for name in runners:
            logits = np.concatenate(seen[name][1:])  # [0] is the warm-up batch
            preds = [labels[i] for i in logits.argmax(-1)]
            rows_out[name] = {
                "examples_per_s": statistics.median(speeds[name]), "examples_per_s_rounds": speeds[name],
                "accuracy": sum(a == b for a, b in zip(preds, gold)) / len(gold),
                "label_agreement": float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1))),
                "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
            }
        size = {"onnx fp32": (out / "onnx" / F.ONNX_FILE).stat().st_size,
                "onnx int8": (out / "onnx-int8" / F.ONNX_FILE).stat().st_size}

    base = rows_out["pytorch (merged)"]
    resumed = f", resumed at step {outcome.resumed_from_step}" if outcome.resumed_from_step else ""
    print(f"bench.export: all-MiniLM-L6-v2 trained {train_s:.0f}s on {args.repo} ({len(p['train'])} rows, "
          f"{args.epochs:g} epochs, {outcome.steps} steps{resumed}); {len(texts)} held-out rows of {len(prepared) if args.all_repos else 1} "
          f"repositories; batch {BATCH}, "
          f"{threads} threads, median of {args.rounds} interleaved rounds; export (onnx + int8 + parity) {export_s:.0f}s")
    print(f"{'variant':<18} {'ex/s':>8} {'x merged':>9} {'accuracy':>9} {'acc diff':>9} {'agree':>7} "
          f"{'max|dlogit|':>12} {'size MB':>8}")
    for name, r in rows_out.items():
        mb = f"{size[name] / 1e6:.1f}" if name in size else "-"
        print(f"{name:<18} {r['examples_per_s']:>8.1f} {r['examples_per_s'] / base['examples_per_s']:>8.2f}x "
              f"{r['accuracy']:>9.3f} {r['accuracy'] - rows_out['pytorch (peft)']['accuracy']:>+9.3f} "
              f"{r['label_agreement']:>7.1%} {r['max_abs_logit_diff']:>12.2e} {mb:>8}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"repo": args.repo, "all_repos": args.all_repos, "epochs": args.epochs, "train_rows": len(p["train"]), "train_s": train_s,
              "steps": outcome.steps, "resumed_from_step": outcome.resumed_from_step,
              "held_out_rows": len(texts), "batch": BATCH, "threads": threads, "rounds": args.rounds,
              "export_s": export_s, "variants": rows_out, "onnx_bytes": size,
              "parity": {k: o.parity for k, o in outcomes.items()},
              "machine_load_1min": os.getloadavg()[0]}
    (RESULTS / "export.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'export.json'}")


if __name__ == "__main__":
    main()
