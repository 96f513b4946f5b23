"""The support bundle's secret rules (services/common/bundle.py), pure."""

from __future__ import annotations

import io
import json
import zipfile

from services.common.bundle import bundle_filename, known_secrets, scrub, zip_files


def test_secrets_are_named_variables_and_url_passwords_not_short_values():
    env = {"OPENAI_API_KEY": "sk-abcdef123456", "GITHUB_TOKEN": "1", "DATABASE_URL": "postgresql://u:p%40ss@h/db",
           "NATS_URL": "nats://127.0.0.1:4222", "HOME": "/root"}
    found = known_secrets(env, urls=["nats://svc:natspw@h:4222"])
    assert "sk-abcdef123456" in found and "p%40ss" in found and "p@ss" in found and "natspw" in found
    assert "1" not in found and "/root" not in found


def test_scrub_masks_a_secret_as_written_and_inside_json_and_counts_it():
    secret = 'pa"ss\\word-123'
    text = json.dumps({"message": f"login {secret} failed", "dsn": "postgresql://me:other@db/x"}) + secret
    clean, n = scrub(text, [secret])
    assert secret not in clean and json.dumps(secret)[1:-1] not in clean and "other" not in clean
    assert n == 3
    assert json.loads(clean[: clean.rindex("}") + 1])["message"] == "login *** failed"


def test_scrub_masks_api_tokens_and_provider_keys_by_shape():
    clean, n = scrub("Bearer tl_abcdefghijklmnopqrstuvwx and sk-proj-ABCDEFGHIJKLMNOPQRST", [])
    assert clean == "Bearer *** and ***" and n == 2


def test_a_bundle_is_a_zip_named_after_a_safe_form_of_the_run_id():
    assert bundle_filename("run/../x y") == "tuneline-bundle-run_.._x_y.zip"
    with zipfile.ZipFile(io.BytesIO(zip_files({"a.txt": "A"}))) as z:
        assert z.read("a.txt") == b"A"
