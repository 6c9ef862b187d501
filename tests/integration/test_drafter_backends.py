"""The language-model drafter backends against real models and real servers, on CPU.

Every model is built here from a real architecture's configuration
(:mod:`tests.drafter_models`), saved with ``save_pretrained`` and loaded by
the backend from that directory only, with the hub offline.

* ``transformers``: a tiny GPT-2 with random weights whose vocabulary is
  finding words and bare numbers (whatever it writes breaks the guardrails:
  the draft falls back to the template with the reason stored); Gemma 3,
  Qwen2.5-VL and LLaVA image-text-to-text models given a key image; and a
  Llama trained in the session on template impressions, whose draft passes
  the guardrails and is kept.
* ``openai``: ``transformers serve`` (an OpenAI-compatible server we did not
  write) serving the trained Llama (kept draft, API key sent) and the Gemma 3,
  Qwen2.5-VL and LLaVA models from one server (key images sent as data URLs;
  Qwen2.5-VL without torchvision through its directory's image-only processor
  code); a peer that accepts connections and
  never answers (timeouts and retries); a closed port (connection refused).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("openai")

from transformers.utils import is_torchvision_available  # noqa: E402

from pacs_ai.report.draft import UNVERIFIED_HEADER, draft_impression, draft_report  # noqa: E402
from pacs_ai.report.drafters import DrafterConfig, DrafterError, get_drafter  # noqa: E402
from pacs_ai.report.drafters.template import TemplateDrafter  # noqa: E402
from pacs_ai.report.evidence import evidence_from_findings  # noqa: E402
from pacs_ai.report.prompts import report_prompt  # noqa: E402
from tests.drafter_models import (  # noqa: E402
    IMAGE_TEXT_FAMILIES,
    TEST_FINDINGS,
    train_impression_model,
    with_images_only_processor_code,
)
from tests.llm_serve import transformers_serve  # noqa: E402, F401 (tests/e2e take it from here)
from tests.peers import free_port  # noqa: E402
from tests.unit.test_report_evidence import chest_ct_header, chest_ct_job  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub")

#: A key image as :func:`pacs_ai.report.images.render_key_images` gives them (8-bit RGB).
KEY_IMAGE = PIL.Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (80, 1))).convert("RGB")

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


@pytest.fixture(scope="module")
def offline_hub():
    """Nothing is downloaded in these tests: the hub is switched off for the process and the servers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def family_model(tmp_path_factory) -> Callable[[str], Path]:
    """Each image-text family's model, built once for the module (the local and the served tests share it)."""
    built: dict[str, Path] = {}

    def model_dir(family: str) -> Path:
        if family not in built:
            built[family] = IMAGE_TEXT_FAMILIES[family](tmp_path_factory.mktemp(family))
        return built[family]

    return model_dir


@pytest.mark.parametrize("family", sorted(IMAGE_TEXT_FAMILIES))
def test_transformers_image_text_to_text_families_draft_from_key_images(family, family_model, evidence):
    """Gemma 3 (MedGemma), Qwen2.5-VL and LLaVA load from a local directory and read the key image."""
    model_dir = family_model(family)
    params = {"model_dir": str(model_dir), "task": "image-text-to-text", "max_new_tokens": 6}
    drafter = get_drafter("transformers", params)
    drafter._load()
    inputs = drafter._inputs(report_prompt(evidence), [KEY_IMAGE])
    assert "pixel_values" in inputs  # the picture is part of the model's input
    if family == "qwen2_5_vl" and not is_torchvision_available():
        # AutoProcessor fails on the video processor: the family's processor is loaded without it.
        assert type(drafter._processor).__name__ == "Qwen2_5_VLProcessorImagesOnly"
        # The 96x80 key image scaled to at most 64x64 pixels and cut in 8-pixel patches: 8 by 6.
        assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]
    draft = draft_report(evidence, images=[KEY_IMAGE], drafter=drafter)
    # Random weights write nonsense: refused for its content, after a real generation with the image.
    assert draft.requested_backend == "transformers" and draft.backend == "template"
    assert "no FINDINGS and IMPRESSION sections" in draft.fallback_reason, draft.fallback_reason
    no_image = draft_report(evidence, drafter=drafter)
    assert "was given no key image" in no_image.fallback_reason


@pytest.mark.skipif(is_torchvision_available(), reason="the fallback is for hosts without torchvision")
def test_a_processor_that_cannot_load_says_why(tmp_path):
    """The image-only fallback is for a missing video processor only; other failures say what is missing."""
    qwen = IMAGE_TEXT_FAMILIES["qwen2_5_vl"](tmp_path / "qwen")
    (qwen / "tokenizer.json").unlink()
    drafter = get_drafter("transformers", {"model_dir": str(qwen), "task": "image-text-to-text"})
    with pytest.raises(DrafterError, match="Qwen2_5_VLProcessor without its video processor failed too"):
        drafter._load()
    # A family without a video processor is not retried: its own error is the reason.
    gemma = IMAGE_TEXT_FAMILIES["gemma3"](tmp_path / "gemma")
    (gemma / "tokenizer.json").unlink()
    drafter = get_drafter("transformers", {"model_dir": str(gemma), "task": "image-text-to-text"})
    with pytest.raises(DrafterError, match="cannot load the model in .*gemma") as refused:
        drafter._load()
    assert "video processor" not in str(refused.value)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory) -> Path:
    """A Llama trained here on template impressions (once per session; a minute or so on CPU)."""
    return train_impression_model(tmp_path_factory.mktemp("trained-llama"))


def test_transformers_trained_model_impression_passes_the_guardrails_and_is_kept(trained_model_dir):
    config = DrafterConfig(
        backend="transformers", params={"model_dir": str(trained_model_dir), "max_new_tokens": 24}
    )
    draft = draft_impression(TEST_FINDINGS, config)
    assert (draft.backend, draft.fallback_reason) == ("transformers", None), draft.fallback_reason
    assert draft.model_id == trained_model_dir.name and draft.guardrails.passed
    assert draft.impression == "Small left pleural effusion."


def test_openai_backend_against_transformers_serve_keeps_the_trained_models_impression(
    trained_model_dir, model_server
):
    os.environ["PACS_AI_TEST_LLM_KEY"] = "secret-for-test"
    try:
        params = {
            "base_url": model_server,
            "model": str(trained_model_dir),
            "api_key_env": "PACS_AI_TEST_LLM_KEY",
            "max_tokens": 24,
            "timeout_seconds": 120,
            "max_retries": 0,
        }
        draft = draft_impression(TEST_FINDINGS, DrafterConfig(backend="openai", params=params))
    finally:
        del os.environ["PACS_AI_TEST_LLM_KEY"]
    assert (draft.backend, draft.fallback_reason) == ("openai", None), draft.fallback_reason
    assert draft.model_id == str(trained_model_dir) and draft.guardrails.passed
    assert draft.impression == "Small left pleural effusion."


@pytest.mark.parametrize("family", sorted(IMAGE_TEXT_FAMILIES))
def test_openai_backend_sends_key_images_to_a_served_image_text_model(
    family, family_model, model_server, tmp_path, evidence
):
    """Gemma 3, Qwen2.5-VL and LLaVA served by ``transformers serve``, given the key image as a data URL.

    ``model_server`` is the session's one server (tests/integration/conftest.py).
    """
    model_dir = family_model(family)
    if family == "qwen2_5_vl" and not is_torchvision_available():
        # A copy: the local test reads the directory as a site's checkpoint has it, without remote code.
        model_dir = with_images_only_processor_code(Path(shutil.copytree(model_dir, tmp_path / family)))
    params = {
        "base_url": model_server,
        "model": str(model_dir),
        "send_images": True,
        "max_tokens": 8,
        "timeout_seconds": 120,
        "max_retries": 0,
    }
    drafter = get_drafter("openai", params)
    draft = draft_report(evidence, images=[KEY_IMAGE], drafter=drafter)
    answer = drafter.complete("FINDINGS:", [KEY_IMAGE])  # the served model read the picture and answered
    assert draft.requested_backend == "openai" and draft.backend == "template"
    # A random model's answer is refused for its content, not because the request failed.
    assert "no FINDINGS and IMPRESSION sections" in draft.fallback_reason, draft.fallback_reason
    # The answer only: no prompt echoed (Qwen's ChatML lets serve find where the answer starts).
    assert isinstance(answer, str) and answer and "FINDINGS:" not in answer


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
        "base_url": f"http://127.0.0.1:{free_port()}/v1",
        "model": "m",
        "timeout_seconds": 2,
        "max_retries": 0,
    }
    draft = draft_report(evidence, DrafterConfig(backend="openai", params=params))
    assert draft.backend == "template" and "cannot reach http://127.0.0.1:" in draft.fallback_reason


def test_openai_request_contract(evidence):
    """What is sent (the served-model tests above check that a real server accepts it)."""
    params = {
        "base_url": "http://127.0.0.1:1/v1",
        "model": "site-llm",
        "max_tokens": 300,
        "send_images": True,
    }
    drafter = get_drafter("openai", params)
    body = drafter.request_body(report_prompt(evidence), [KEY_IMAGE])
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("site-llm", 300, 0.0, 0)
    [message] = body["messages"]
    [image, text] = message["content"]
    assert message["role"] == "user" and image["image_url"]["url"].startswith("data:image/png;base64,")
    assert "Right lung: volume 2512 mL" in text["text"] and "Copy every number exactly" in text["text"]
    assert "FINDINGS:" in text["text"] and "IMPRESSION:" in text["text"]
