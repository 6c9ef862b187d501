"""The language-model drafter backends against real models and real servers, on CPU in seconds.

* ``transformers``: a tiny GPT-2 with random weights and a word-level
  tokenizer, both built here and saved with ``save_pretrained``, loaded by the
  backend from that directory only.  Its vocabulary is finding words and bare
  numbers, so whatever it writes breaks the guardrails, which is the point:
  the draft must fall back to the template with the reason stored.
* ``openai``: the same model served by ``transformers serve`` (an
  OpenAI-compatible server we did not write) on 127.0.0.1; a peer that
  accepts connections and never answers (timeouts and retries); a closed
  port (connection refused); and an HTTP server that records the request body
  and answers a well-formed draft (the request contract, and a kept draft).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("openai")

from pacs_ai.report.draft import UNVERIFIED_HEADER, draft_impression, draft_report  # noqa: E402
from pacs_ai.report.drafters import DrafterConfig, get_drafter  # noqa: E402
from pacs_ai.report.drafters.template import TemplateDrafter  # noqa: E402
from pacs_ai.report.evidence import evidence_from_findings  # noqa: E402
from tests.unit.test_report_evidence import chest_ct_header, chest_ct_job  # noqa: E402

#: Every word here breaks a guardrail when the evidence does not mention it: findings and unit-less numbers.
VOCABULARY = ["nodule", "mass", "fracture", "pneumonia", "consolidation", "7", "13", "42", "2600"]
FINDINGS_TEXT = "No pneumothorax. Small left pleural effusion. Heart size is normal."


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2} | {word: i + 3 for i, word in enumerate(VOCABULARY)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(vocab),
        n_positions=2048,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config)
    # Never the special tokens, never stop early: every answer is vocabulary words.
    model.generation_config = transformers.GenerationConfig(suppress_tokens=[0, 1, 2], pad_token_id=1)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture
def evidence():
    return evidence_from_findings(chest_ct_header(), chest_ct_job())


def test_transformers_impression_from_a_random_model_falls_back_with_the_guardrail_reason(tiny_model_dir):
    config = DrafterConfig(
        backend="transformers", params={"model_dir": str(tiny_model_dir), "max_new_tokens": 12}
    )
    draft = draft_impression(FINDINGS_TEXT, config)
    assert draft.requested_backend == "transformers" and draft.backend == "template"
    assert draft.fallback_reason.startswith("transformers impression failed the guardrails: ")
    assert {"unsupported", "numbers"} & draft.guardrails.checks_failed() == set()  # the kept template passes
    written = draft.rejected.impression.split()
    assert len(written) == 12 and set(written) <= set(VOCABULARY)
    assert draft.impression == "Small left pleural effusion."
    assert draft.text.startswith(UNVERIFIED_HEADER)


def test_transformers_report_from_a_random_model_falls_back(tiny_model_dir, evidence):
    drafter = get_drafter("transformers", {"model_dir": str(tiny_model_dir), "max_new_tokens": 8})
    draft = draft_report(evidence, drafter=drafter)
    assert draft.backend == "template" and draft.requested_backend == "transformers"
    assert "no FINDINGS and IMPRESSION sections" in draft.fallback_reason
    assert draft.findings == TemplateDrafter().draft_report(evidence).findings
    # The loaded model is kept by the instance: a second draft does not load it again.
    model = drafter._model
    draft_report(evidence, drafter=drafter)
    assert drafter._model is model


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served_model(tiny_model_dir):
    """``transformers serve`` on 127.0.0.1 with the tiny model (an OpenAI-compatible server not ours)."""
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("the transformers CLI is not installed")
    port = _free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        executable,
        "serve",
        str(tiny_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.stdout.read() if process.stdout else ""
                pytest.fail(f"transformers serve did not come up:\n{output[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(tiny_model_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_openai_backend_against_transformers_serve_falls_back_on_its_random_impression(served_model):
    base_url, model = served_model
    params = {"base_url": base_url, "model": model, "max_tokens": 12, "timeout_seconds": 60, "max_retries": 0}
    draft = draft_impression(FINDINGS_TEXT, DrafterConfig(backend="openai", params=params))
    assert draft.requested_backend == "openai" and draft.backend == "template"
    assert draft.fallback_reason.startswith("openai impression failed the guardrails: ")
    assert set(draft.rejected.impression.split()) <= set(VOCABULARY)


def test_openai_backend_report_against_transformers_serve(served_model, evidence):
    base_url, model = served_model
    params = {"base_url": base_url, "model": model, "max_tokens": 8, "max_retries": 0}
    draft = draft_report(evidence, DrafterConfig(backend="openai", params=params))
    assert draft.backend == "template"
    assert "openai backend failed: the model's answer has no FINDINGS and IMPRESSION" in draft.fallback_reason


def test_openai_backend_times_out_and_retries_against_a_silent_peer(evidence):
    accepted: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(connection)

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    params = {
        "base_url": f"http://127.0.0.1:{port}/v1",
        "model": "m",
        "timeout_seconds": 0.5,
        "max_retries": 1,
    }
    try:
        started = time.monotonic()
        draft = draft_report(evidence, DrafterConfig(backend="openai", params=params))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        listener.close()
    assert draft.backend == "template"
    assert "did not answer within 0.5 s (2 attempts)" in draft.fallback_reason
    assert len(accepted) == 2  # the first attempt and one retry
    assert 1.0 <= elapsed < 10.0


def test_openai_backend_reports_a_refused_connection(evidence):
    params = {
        "base_url": f"http://127.0.0.1:{_free_port()}/v1",
        "model": "m",
        "timeout_seconds": 2,
        "max_retries": 0,
    }
    draft = draft_report(evidence, DrafterConfig(backend="openai", params=params))
    assert draft.backend == "template" and "cannot reach http://127.0.0.1:" in draft.fallback_reason


def test_openai_request_contract_and_a_kept_draft(evidence):
    requests: list[tuple[str, str, dict]] = []
    good = TemplateDrafter().draft_report(evidence)
    answer_text = f"FINDINGS:\n{good.findings}\nIMPRESSION:\n{good.impression}"

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers.get("Authorization", ""), body))
            payload = json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": answer_text},
                        }
                    ],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    os.environ["PACS_AI_TEST_LLM_KEY"] = "secret-for-test"
    try:
        params = {
            "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
            "model": "site-llm",
            "api_key_env": "PACS_AI_TEST_LLM_KEY",
            "max_tokens": 300,
        }
        draft = draft_report(evidence, DrafterConfig(backend="openai", params=params))
    finally:
        del os.environ["PACS_AI_TEST_LLM_KEY"]
        server.shutdown()
        server.server_close()
    assert (draft.backend, draft.model_id, draft.fallback_reason) == ("openai", "site-llm", None)
    assert draft.findings == good.findings and draft.guardrails.passed
    [(path, authorization, body)] = requests
    assert path == "/v1/chat/completions"
    assert authorization == "Bearer secret-for-test"
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("site-llm", 300, 0.0, 0)
    [message] = body["messages"]
    assert message["role"] == "user"
    assert (
        "Right lung: volume 2512 mL" in message["content"]
        and "Copy every number exactly" in message["content"]
    )
    assert "FINDINGS:" in message["content"] and "IMPRESSION:" in message["content"]
