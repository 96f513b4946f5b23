"""The Anthropic backend refuses training (no public fine-tuning API) and never touches the network."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest

from services.trainer.hosted.anthropic_backend import AnthropicHostedBackend
from services.trainer.hosted.base import HostedBackend, HostedJobSpec, HostedTrainingError

try:  # the installed anthropic SDK takes an httpx2 client; older releases took httpx
    import httpx2 as http
except ImportError:  # pragma: no cover
    import httpx as http

KEY = "sk-ant-tuneline-FAKE-KEY-never-used-9c1e"


def _no_network(request):
    pytest.fail(f"the Anthropic backend made an HTTP call: {request.method} {request.url}")


@pytest.fixture
def backend() -> AnthropicHostedBackend:
    client = anthropic.Anthropic(api_key=KEY, max_retries=0,
                                 http_client=http.Client(transport=http.MockTransport(_no_network)))
    return AnthropicHostedBackend(client)


def _spec(tmp_path: Path) -> HostedJobSpec:
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": []}\n')
    return HostedJobSpec(base_model="claude-3-haiku-20240307", training_file=train, idempotency_key="run-1/trainer")


def test_every_training_request_is_refused_without_a_network_call(backend, tmp_path):
    assert isinstance(backend, HostedBackend)
    calls = [
        lambda: backend.submit(_spec(tmp_path)),
        lambda: backend.follow("ftjob-1", poll_interval=0.001, timeout=1),
        lambda: backend.cancel("ftjob-1"),
        lambda: backend.pause("ftjob-1"),
        lambda: backend.resume("ftjob-1"),
    ]
    for call in calls:
        with pytest.raises(HostedTrainingError) as err:
            call()
        e = err.value
        assert e.reason_code == "training.capability_unsupported"
        assert not e.retryable
        assert "Amazon Bedrock" in e.message
        assert "no public fine-tuning API" in e.message
        assert KEY not in str(e) and KEY not in repr(e)
    assert KEY not in repr(backend)


def test_refusal_needs_no_client_and_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(HostedTrainingError) as err:
        AnthropicHostedBackend().submit(_spec(tmp_path))
    assert err.value.reason_code == "training.capability_unsupported"
