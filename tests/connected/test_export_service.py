"""The export service on a real nats-server: an evaluated tiny classifier exported as the adapter, merged
and ONNX with each format's parity in export.completed; `export.run` (what `tuneline export RUN --format
onnx-int8` publishes) answered by export.reexported through publish_and_wait, and its named refusals: a
format unknown to the shape, a run with no evaluation, a base model whose weights changed since the
export, a read-only export folder."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from contracts import subjects  # noqa: E402
from contracts.commands import ExportRun  # noqa: E402
from contracts.events import ClassificationMetrics, EvalCompleted  # noqa: E402
from contracts.registry import decode  # noqa: E402
from services.common.artifacts import ArtifactStore  # noqa: E402
from services.common.bus import publish  # noqa: E402
from services.common.commands import envelope_of, publish_and_wait  # noqa: E402
from services.export import app as export_app  # noqa: E402
from services.export.domain import verify_export  # noqa: E402
from services.export.settings import ExportSettings  # noqa: E402
from services.trainer.local.engine import train  # noqa: E402
from services.trainer.local.tasks import SequenceClassification  # noqa: E402
from services.trainer.recipes import resolve_recipe  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.factories import envelope, plan  # noqa: E402
from tests.tiny_models import LABEL_SPACE, build_tiny_bert, sentiment_rows  # noqa: E402

pytestmark = pytest.mark.connected
RUN = "run-export-1"


def rows() -> list[dict]:
    texts, labels = sentiment_rows()
    return [{"row_id": f"r{i}", "text": t, "label": lab} for i, (t, lab) in enumerate(zip(texts, labels))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-svc")
    base = build_tiny_bert(root / "base")
    recipe = resolve_recipe("seqcls-lora-minilm", "single_label_classification",
                            dict(base_model=base, batch_size=40, learning_rate=1e-2, max_length=8, seed=2, epochs=20,
                                 eval_every_steps=20, patience=None, pooling="mean"))
    adapter = train(SequenceClassification(LABEL_SPACE), recipe, rows(), rows(), root / "w", root / "a").adapter_dir
    return base, adapter


def evaluated(store: ArtifactStore, base: str, adapter) -> EvalCompleted:
    m = ClassificationMetrics(accuracy=1.0, macro_f1=1.0, n=40)
    test = store.put_bytes("".join(json.dumps(r) + "\n" for r in rows()).encode())
    return EvalCompleted(plan=plan("reviews"), base_model=base, adapter=store.put_dir(adapter), eval=test,
                         candidate=m, base=m, label_space=LABEL_SPACE)


async def events_of(js, run_id: str) -> dict:
    info = await js.stream_info(subjects.STREAM)
    out: dict = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        e, payload = decode((await js.get_msg(subjects.STREAM, seq)).data)
        if e.run_id == run_id:
            out.setdefault(e.type, []).append((e, payload))
    return out


async def started(nats_server, data, **kw):
    svc = export_app.build(ExportSettings(nats_url=nats_server.url, data_dir=data, formats=("merged", "onnx"), **kw))
    await svc.prepare_broker()
    await svc.broker.start()
    return svc


async def exported(js, svc, store, base, adapter, run_id=RUN):
    await publish(js, envelope(evaluated(store, base, adapter), run_id=run_id, producer="evaluator"),
                  subjects.subject_for("eval.completed", kind="event"))

    async def done():
        evs = await events_of(js, run_id)
        return evs if "export.completed" in evs or "export.failed" in evs else None

    return await wait_for(done, timeout=240)


async def test_an_evaluated_run_ships_each_format_with_parity_and_a_reexport_adds_onnx_int8(
        js, nats_server, tmp_path, trained):
    base, adapter = trained
    data = tmp_path / "data"
    store = ArtifactStore((data / "artifacts").resolve())
    svc = await started(nats_server, data)
    try:
        evs = await exported(js, svc, store, base, adapter)
        assert "export.failed" not in evs, evs.get("export.failed")
        _, done = evs["export.completed"][0]
        got = {f.format: f for f in done.formats}
        assert list(got) == ["peft-adapter", "merged", "onnx"]
        assert all(f.status == "shipped" for f in done.formats)
        for fmt in ("merged", "onnx"):
            assert got[fmt].parity.labels_identical and got[fmt].parity.max_abs_logit_diff <= 1e-4
            assert got[fmt].parity.rows == 40
        assert got["onnx"].runtime.startswith("onnxruntime")
        out = store.materialize_dir(done.export, tmp_path / "x")
        assert verify_export(out) == [] and (out / "onnx" / "model.onnx").is_file()
        manifest = json.loads((out / "export_manifest.json").read_text())
        assert manifest["base"]["weights_sha256"] == done.base_model_sha256 and manifest["head"]["pooling"] == "mean"
        assert "vocab.txt" in manifest["base"]["tokenizer_sha256"]

        # the re-export, as the CLI sends it: a run of its own naming the run, answered by the event it caused
        answer = await publish_and_wait(js, envelope_of(ExportRun(run_id=RUN, formats=["onnx-int8"]), "export-a",
                                                        "cli"), 240)
        assert answer is not None and answer["type"] == "export.reexported", answer
        p = answer["payload"]
        [int8] = [f for f in p["formats"] if f["format"] == "onnx-int8"]
        assert int8["status"] == "shipped" and int8["parity"]["accuracy_drop"] is not None
        assert [f["format"] for f in p["formats"]] == ["peft-adapter", "onnx-int8"] and p["source_run_id"] == RUN
        again = store.materialize_dir(type(done.export)(**p["export"]), tmp_path / "y")
        assert verify_export(again) == [] and (again / "onnx-int8" / "model.onnx").is_file()

        # a format the shape does not have: refused by name, nothing exported
        refused = await publish_and_wait(js, envelope_of(ExportRun(run_id=RUN, formats=["gguf"]), "export-b", "cli"),
                                         120)
        assert refused["type"] == "export.failed" and refused["reason_code"] == "export.format_unknown"
        assert "onnx-int8" in refused["payload"]["message"]
        # a run nobody evaluated
        unknown = await publish_and_wait(js, envelope_of(ExportRun(run_id="run-nobody", formats=["onnx"]), "export-c",
                                                         "cli"), 120)
        assert unknown["type"] == "export.failed" and unknown["reason_code"] == "export.run_unknown"
        # the run the commands named is untouched: neither a failure nor a second export in it
        assert {t: len(v) for t, v in (await events_of(js, RUN)).items()} == {"eval.completed": 1,
                                                                              "export.completed": 1}
    finally:
        await svc.broker.stop()


async def test_a_reexport_onto_a_base_whose_weights_changed_is_refused(js, nats_server, tmp_path, trained):
    base, adapter = trained
    moved = shutil.copytree(base, tmp_path / "base")
    data = tmp_path / "data"
    store = ArtifactStore((data / "artifacts").resolve())
    svc = await started(nats_server, data)
    try:
        evs = await exported(js, svc, store, str(moved), adapter, run_id="run-export-2")
        assert "export.completed" in evs
        weights = moved / "model.safetensors"
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 0xFF
        weights.write_bytes(bytes(blob))
        answer = await publish_and_wait(js, envelope_of(ExportRun(run_id="run-export-2", formats=["onnx"]),
                                                        "export-d", "cli"), 120)
        assert answer["type"] == "export.failed" and answer["reason_code"] == "export.base_model_changed"
        assert "weights sha256" in answer["payload"]["message"]
    finally:
        await svc.broker.stop()


async def test_a_read_only_export_folder_fails_the_export_by_name(js, nats_server, tmp_path, trained):
    base, adapter = trained
    point = tmp_path / "ro"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(point)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    data = tmp_path / "data"
    store = ArtifactStore((data / "artifacts").resolve())
    svc = await started(nats_server, data, work_dir=point)
    try:
        evs = await exported(js, svc, store, base, adapter, run_id="run-export-3")
        [(env, failed)] = evs["export.failed"]
        assert env.reason_code == "export.directory_read_only" and str(point) in failed.message
        assert "export.completed" not in evs
    finally:
        await svc.broker.stop()
        subprocess.run(["umount", "-l", str(point)], check=False)
