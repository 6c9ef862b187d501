"""Tiny language models of the families sites load, built here from their configurations (no download).

Each builder saves a randomly initialised model of a real architecture with a
tokenizer or processor that loads offline from the same directory:

* text-only: Llama (``LlamaForCausalLM``), trained by :func:`train_impression_model`
  on template impressions so that its drafts pass the guardrails;
* image-text-to-text: Gemma 3 (MedGemma's family), Qwen2.5-VL and LLaVA, each
  with its own processor class built from its image-processor class.  Without
  torchvision, Qwen2.5-VL's processor is built without its video processor
  (which needs torchvision) from the slow PIL/numpy image processor and saved
  under the family's class name, as a site's checkpoint has it.

The tokenizer is a byte-level BPE trained on the prompts and template drafts
(:func:`draft_corpus`), wrapped in ``PreTrainedTokenizerFast``, with the
family's image tokens added as special tokens.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.utils import is_torchvision_available

from pacs_ai.report.drafters.template import TemplateDrafter
from pacs_ai.report.drafters.transformers_backend import images_only_processor
from pacs_ai.report.evidence import Evidence
from pacs_ai.report.prompts import impression_prompt, report_prompt

PAD, EOS = "<pad>", "<eos>"

#: What a chat template renders: the messages' text, images as the family's placeholder, nothing else.
_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}IMAGE{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)

#: The findings the trained model is asked about in the tests (it is among its training examples).
TEST_FINDINGS = "No pneumothorax. Small left pleural effusion. Heart size is normal."


def impression_examples(seed: int = 0) -> list[tuple[str, str]]:
    """(findings, template impression) pairs from synthetic chest radiograph findings."""
    rng = random.Random(seed)
    positives = []
    for size, side, finding in itertools.product(
        ("Small", "Moderate", "Large"), ("left", "right"), ("pleural effusion", "pneumothorax")
    ):
        positives.append(f"{size} {side} {finding}.")
    normals = ["No pneumothorax.", "Heart size is normal.", "No pleural effusion.", "No focal consolidation."]
    template = TemplateDrafter()
    pairs = [(TEST_FINDINGS, template.draft_impression(TEST_FINDINGS))]
    for sentence in positives:
        others = [n for n in normals if n.split()[-1] != sentence.split()[-1]]
        parts = [*rng.sample(others, 2), sentence]
        rng.shuffle(parts)
        findings = " ".join(parts)
        pairs.append((findings, template.draft_impression(findings)))
    return pairs


def draft_corpus() -> list[str]:
    """Prompt and answer text the tokenizer is trained on."""
    return [impression_prompt(findings, None) + impression for findings, impression in impression_examples()]


def build_tokenizer(
    extra_special: Sequence[str] = (),
    named: dict[str, str] | None = None,
    vocab_size: int = 600,
    corpus: Sequence[str] | None = None,
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` (:func:`draft_corpus` by default): decodes what it encodes.

    ``named`` are special tokens the processor reads as tokenizer attributes (``boi_token``, ...).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(draft_corpus() if corpus is None else corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, extra_special_tokens=named or {}
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def _with_image_tokens(image_text: str) -> str:
    return _CHAT_TEMPLATE.replace("IMAGE", image_text)


#: Qwen's ChatML: each message between ``<|im_start|>role`` and ``<|im_end|>``, then the assistant's turn
#: opened (what ``transformers serve`` looks for to read the answer of a Qwen model).
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}IMAGE"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _text_config(vocab_size: int, **extra: object) -> dict[str, object]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": None,
    } | extra


def _save(directory: Path, model: transformers.PreTrainedModel, processor: object) -> Path:
    model.generation_config = transformers.GenerationConfig(pad_token_id=0, eos_token_id=1)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def build_gemma3(directory: Path) -> Path:
    """A random Gemma 3 image-text-to-text model (MedGemma's architecture) with ``Gemma3Processor``."""
    boi, image, eoi = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
    tokenizer = build_tokenizer([boi, image, eoi], {"boi_token": boi, "image_token": image, "eoi_token": eoi})
    tokenizer.chat_template = _with_image_tokens(boi)
    tokens_per_image = 4
    torch.manual_seed(0)
    config = transformers.Gemma3Config(
        text_config=_text_config(len(tokenizer), sliding_window=64, layer_types=["full_attention"]),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(boi),
        eoi_token_index=tokenizer.convert_tokens_to_ids(eoi),
        image_token_index=tokenizer.convert_tokens_to_ids(image),
    )
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=tokens_per_image,
    )
    return _save(directory, transformers.Gemma3ForConditionalGeneration(config), processor)


def build_qwen2_5_vl(directory: Path) -> Path:
    """A random Qwen2.5-VL model with ``Qwen2_5_VLProcessor``."""
    start, image, end = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
    tokenizer = build_tokenizer([start, image, end, "<|video_pad|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = _CHATML_TEMPLATE.replace("IMAGE", start + image + end)
    torch.manual_seed(0)
    config = transformers.Qwen2_5_VLConfig(
        text_config=_text_config(len(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,
            "fullatt_block_indexes": [0],
        },
        image_token_id=tokenizer.convert_tokens_to_ids(image),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(start),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(end),
    )
    sizes = {"patch_size": 8, "merge_size": 2, "temporal_patch_size": 2}
    pixels = {"min_pixels": 32 * 32, "max_pixels": 64 * 64}
    parts = {"tokenizer": tokenizer, "chat_template": tokenizer.chat_template}
    if is_torchvision_available():
        processor = transformers.Qwen2_5_VLProcessor(
            image_processor=transformers.Qwen2VLImageProcessor(**sizes, **pixels),
            video_processor=transformers.Qwen2VLVideoProcessor(**sizes),
            **parts,
        )
    else:
        # The slow (PIL/numpy) image processor; the video processor needs torchvision, so the
        # processor is built without one and saved under the family's class name, as sites have it.
        images_only = images_only_processor(transformers.Qwen2_5_VLProcessor)
        processor = images_only(
            image_processor=transformers.Qwen2VLImageProcessorPil(**sizes, **pixels), **parts
        )
    _save(directory, transformers.Qwen2_5_VLForConditionalGeneration(config), processor)
    saved = directory / "processor_config.json"
    saved.write_text(json.dumps(json.loads(saved.read_text()) | {"processor_class": "Qwen2_5_VLProcessor"}))
    return directory


def build_llava(directory: Path) -> Path:
    """A random LLaVA (CLIP vision tower, Llama text model) with ``LlavaProcessor``."""
    image = "<image>"
    tokenizer = build_tokenizer([image])
    tokenizer.chat_template = _with_image_tokens(image)
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**_text_config(len(tokenizer))),
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(image),
        vision_feature_layer=-1,
    )
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1,
    )
    return _save(directory, transformers.LlavaForConditionalGeneration(config), processor)


IMAGE_TEXT_FAMILIES: dict[str, Callable[[Path], Path]] = {
    "gemma3": build_gemma3,
    "qwen2_5_vl": build_qwen2_5_vl,
    "llava": build_llava,
}


def train_impression_model(directory: Path, *, steps: int = 250, seed: int = 0) -> Path:
    """A Llama trained on (impression prompt -> template impression) until it answers them as the template."""
    pairs = [
        (impression_prompt(findings, None), impression) for findings, impression in impression_examples()
    ]
    return train_model(directory, pairs, build_tokenizer(), steps=steps, seed=seed)


#: How far (in logits) each taught token must lead every other one before a report model is done.
#: With 120 steps the report model led by less than 0 at one token: it wrote the left lung's Perc15
#: as -857 HU (its mean lung density) instead of -869 HU; after 200 steps the lead was 5.6, after 300
#: 6.5-6.9 (seeds 0-3), about 5 s of one core.
REPORT_MIN_MARGIN = 2.0


def train_report_model(directory: Path, evidence: Evidence, *, steps: int = 300, seed: int = 0) -> Path:
    """A Llama trained to answer ``evidence``'s report prompt with a report of its own, word for word.

    Its report is the template's with the findings' lines in reverse order:
    every statement is one the guardrails accept, and the text is not the
    template's, so a test can tell the model's draft from the template fallback.
    The report repeats the same values in several lines ("-857 HU", "-869 HU"
    for each lung), so the model is trained until every token of it leads by
    :data:`REPORT_MIN_MARGIN` (greedy decoding then writes it exactly, with room
    for another CPU's rounding), at most twice ``steps``.
    """
    answer = model_report(evidence)
    prompt = report_prompt(evidence)
    tokenizer = build_tokenizer(vocab_size=800, corpus=[prompt + answer])
    return train_model(
        directory,
        [(prompt, answer)],
        tokenizer,
        steps=steps,
        seed=seed,
        min_margin=REPORT_MIN_MARGIN,
        max_steps=2 * steps,
    )


def model_report(evidence: Evidence) -> str:
    """The answer :func:`train_report_model` teaches: the template's report, findings lines reversed."""
    text = TemplateDrafter().draft_report(evidence)
    lines = [line for line in text.findings.splitlines() if line.strip()]
    return "FINDINGS:\n" + "\n".join(reversed(lines)) + "\nIMPRESSION:\n" + text.impression


def train_model(
    directory: Path,
    pairs: Sequence[tuple[str, str]],
    tokenizer: transformers.PreTrainedTokenizerFast,
    *,
    steps: int,
    seed: int = 0,
    min_margin: float | None = None,
    max_steps: int | None = None,
) -> Path:
    """A small Llama trained on (prompt -> answer) pairs until it answers them as given.

    Loss on the answer tokens only; the answer ends with EOS so generation stops.
    Deterministic: seeded, one thread, full batch.  With ``min_margin`` it trains
    on after ``steps`` (:data:`_MORE_STEPS` at a time, up to ``max_steps``) until
    every answer token's logit leads every other token's by ``min_margin`` given
    the answer before it (:func:`answer_margin`), and raises if it never does:
    a model that has not learnt its answer fails here, not in a draft.
    """
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        **_text_config(
            len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16
        ),
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    rows = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = [*tokenizer(answer)["input_ids"], 1]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    if width > config.max_position_embeddings:
        raise ValueError(f"a training example of {width} tokens is longer than the model's context")
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    # One thread: a model this small gains nothing from more, and on a busy machine (CI runs
    # servers beside the tests) two threads made a step 30 times slower (4 s instead of 0.12 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def train(count: int) -> None:
            model.train()
            for _ in range(count):
                loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

        train(steps)
        done = steps
        if min_margin is not None:
            limit = steps if max_steps is None else max_steps
            margin = answer_margin(model, input_ids, attention, labels)
            while margin < min_margin and done < limit:
                more = min(_MORE_STEPS, limit - done)
                train(more)
                done += more
                margin = answer_margin(model, input_ids, attention, labels)
            if margin < min_margin:
                raise RuntimeError(
                    f"after {done} steps the model's answer tokens lead by {margin:.2f} at least, "
                    f"below {min_margin}: it has not learnt its answers"
                )
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return _save(directory, model, tokenizer)


#: Steps trained at a time after the first ``steps`` until the answers are learnt (:func:`train_model`).
_MORE_STEPS = 50


def answer_margin(
    model: transformers.PreTrainedModel,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """The smallest lead of an answer token's logit over the best other token's, the answer before it given.

    Above 0 at every token, greedy decoding writes the answers exactly; the lead
    is the room left for rounding that differs between CPUs and between a full
    forward pass and cached generation.
    """
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    targets = labels[:, 1:]
    taught = targets != -100
    chosen = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    others = logits.scatter(-1, targets.clamp(min=0)[..., None], float("-inf")).amax(-1)
    return float((chosen - others)[taught].min())


#: A model directory's own processor code, for ``transformers serve --trust-remote-code`` without torchvision.
_IMAGES_ONLY_CODE = '''"""Qwen2.5-VL's processor for still images (its video processor needs torchvision)."""

from transformers import Qwen2_5_VLProcessor


class Qwen2_5_VLProcessorImagesOnly(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
        )
'''


def with_images_only_processor_code(directory: Path) -> Path:
    """Give a Qwen2.5-VL directory its own image-only processor class as remote code (``auto_map``).

    How a site serves the family with ``transformers serve`` on a host without
    torchvision: the server loads ``AutoProcessor`` and has no fallback of its own.
    """
    (directory / "processing_images_only.py").write_text(_IMAGES_ONLY_CODE)
    saved = directory / "processor_config.json"
    auto_map = {"AutoProcessor": "processing_images_only.Qwen2_5_VLProcessorImagesOnly"}
    saved.write_text(json.dumps(json.loads(saved.read_text()) | {"auto_map": auto_map}))
    return directory
