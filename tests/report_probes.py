"""A probe set for the report guardrails: findings -> impression pairs, faithful or not, by category.

The IU X-ray reports themselves are not in the repository (CC BY-NC-ND: no
derivatives may be published, and controlled edits are derivatives), so the
base pairs here are written in the style of IU X-ray reports (their
phrasings: "The heart is normal in size.", "No focal airspace disease.",
"No pneumothorax or pleural effusion.") with slots for the words a controlled
edit changes.  ``benchmarks/guardrail_probes.py`` applies the same edits to
the real IU X-ray reports where the data is on the machine.

Each base case yields faithful impressions (as written, with qualifiers
dropped, hedged) and edited ones that contradict or go beyond the findings,
one category per edit: negation, laterality, location, severity, certainty,
time, numbers, unsupported (a finding added), summary ("no acute ..." over an
acute finding) and diagnosis (pneumonia stated as certain from a
consolidation).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

NORMAL_FINDINGS = (
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Heart size within normal limits. No focal airspace disease. No pneumothorax or pleural effusion.",
    "The cardiomediastinal silhouette is within normal limits for size and contour. The lungs are clear. "
    "No pneumothorax or pleural effusion.",
    "Normal heart size. The lungs are clear bilaterally. No pleural effusion or pneumothorax.",
    "The heart and mediastinum are normal. The lungs are clear. "
    "There is no pleural effusion or pneumothorax.",
    "Cardiac silhouette is normal in size. No focal consolidation, pleural effusion, or pneumothorax.",
)
NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary abnormality.",
    "No active disease.",
    "No acute cardiopulmonary disease.",
    "Normal chest.",
    "No acute cardiopulmonary process.",
)
#: Findings an edit may add, with words whose presence in the findings makes the addition not new.
ADDITIONS = (
    ("Small left pneumothorax.", ("pneumothorax",)),
    ("Right lower lobe pneumonia.", ("consolidation", "airspace", "opacity", "opacities")),
    ("Aortic dissection.", ("aort",)),
    ("Pulmonary embolism.", ("embol",)),
    ("Metastatic disease.", ("metasta", "nodule", "mass")),
    ("Acute left rib fracture.", ("fracture",)),
    ("Free air under the right hemidiaphragm.", ("free air",)),
    ("Right upper lobe mass.", ("mass", "nodule")),
    ("Moderate pulmonary edema.", ("edema",)),
    ("Reactivation tuberculosis in the right upper lobe.", ("tuberculosis",)),
    ("Endotracheal tube in satisfactory position.", ("endotracheal",)),
    ("Cardiomegaly.", ("cardiomegaly", "enlarged")),
    ("Small bilateral pleural effusions.", ("effusion",)),
    ("Mediastinal widening.", ("mediastin",)),
    ("Pneumomediastinum.", ("pneumomediastinum",)),
)


@dataclass(frozen=True)
class Case:
    """Findings and impression with slots ({side}, {sev}, {zone}, {time}, {hedge}, {num}, {num2})."""

    findings: str
    impression: str
    slots: tuple[tuple[str, str], ...] = ()
    #: The finding's phrase, for the negation edit ("No {finding}.").
    finding: str = ""
    #: The impression asserts nothing (a normal study): the negation edit asserts ``finding`` instead.
    negative: bool = False
    #: True: "no acute cardiopulmonary abnormality" contradicts these findings; None: no such probe.
    acute: bool | None = None


def case(
    findings: str,
    impression: str,
    finding: str = "",
    negative: bool = False,
    acute: bool | None = None,
    **slots: str,
) -> Case:
    return Case(findings, impression, tuple(slots.items()), finding, negative, acute)


CASES: tuple[Case, ...] = (
    # pleural effusions
    case(
        "The heart is normal in size. There is a {sev} {side} pleural effusion. No pneumothorax.",
        "{sev} {side} pleural effusion.",
        "pleural effusion",
        sev="small",
        side="right",
        acute=True,
    ),
    case(
        "Heart size is normal. {sev} {side} pleural effusion with adjacent atelectasis. No pneumothorax.",
        "{sev} {side} pleural effusion with adjacent atelectasis.",
        "pleural effusion",
        sev="moderate",
        side="left",
        acute=True,
    ),
    case(
        "Stable cardiomegaly. {sev} {side} pleural effusions. No pneumothorax.",
        "Cardiomegaly with {sev} {side} pleural effusions.",
        "pleural effusions",
        sev="small",
        side="bilateral",
    ),
    case(
        "{time} {sev} {side} pleural effusion. The lungs are otherwise clear. Heart size is normal.",
        "{time} {sev} {side} pleural effusion.",
        "pleural effusion",
        time="stable",
        sev="small",
        side="left",
    ),
    case(
        "Blunting of the {side} costophrenic angle, {hedge} a small effusion. No focal consolidation.",
        "{hedge} small {side} pleural effusion.",
        "pleural effusion",
        hedge="possibly",
        side="right",
    ),
    # pneumothorax
    case(
        "There is a {sev} {side} apical pneumothorax. The lungs are otherwise clear. Heart size normal.",
        "{sev} {side} pneumothorax.",
        "pneumothorax",
        sev="small",
        side="right",
        acute=True,
    ),
    case(
        "{sev} {side} pneumothorax with mediastinal shift. No pleural effusion.",
        "{sev} {side} pneumothorax.",
        "pneumothorax",
        sev="large",
        side="left",
        acute=True,
    ),
    case(
        "{side} chest tube in place. {time} {sev} {side} pneumothorax. No pleural effusion.",
        "{time} {sev} {side} pneumothorax with chest tube in place.",
        "pneumothorax",
        side="right",
        time="stable",
        sev="small",
    ),
    case(
        "The {side} pneumothorax measures {num} at the apex. Heart size is normal.",
        "{side} apical pneumothorax measuring {num}.",
        "pneumothorax",
        side="left",
        num="2 cm",
        acute=True,
    ),
    # consolidation, pneumonia, opacities
    case(
        "There is focal consolidation in the {side} {zone}. No pleural effusion or pneumothorax. "
        "Heart size is normal.",
        "{side} {zone} consolidation, may represent pneumonia.",
        "consolidation",
        side="right",
        zone="lower lobe",
        acute=True,
    ),
    case(
        "Airspace opacity in the {side} {zone}. The heart is normal in size. No pleural effusion.",
        "{side} {zone} airspace disease concerning for pneumonia.",
        "airspace disease",
        side="left",
        zone="lower lobe",
        acute=True,
    ),
    case(
        "{hedge} {side} {zone} opacity. The heart and mediastinum are normal. No pneumothorax.",
        "{hedge} {side} {zone} infiltrate.",
        "opacity",
        hedge="questionable",
        side="right",
        zone="middle lobe",
    ),
    case(
        "Streaky opacity in the {side} {zone}, likely atelectasis. No pleural effusion or pneumothorax.",
        "{side} {zone} opacity, likely atelectasis.",
        "opacity",
        side="left",
        zone="lower lobe",
    ),
    case(
        "{time} {side} {zone} airspace disease. No pleural effusion. Heart size normal.",
        "{time} {side} {zone} airspace disease.",
        "airspace disease",
        time="new",
        side="right",
        zone="upper lobe",
        acute=True,
    ),
    case(
        "{sev} {side} basilar atelectasis. The lungs are otherwise clear. No pleural effusion.",
        "{sev} {side} basilar atelectasis.",
        "atelectasis",
        sev="mild",
        side="bilateral",
    ),
    case(
        "{time} {side} {zone} consolidation. Heart size is normal. No pneumothorax.",
        "{time} {side} {zone} consolidation.",
        "consolidation",
        time="improving",
        side="left",
        zone="upper lobe",
    ),
    # heart, edema
    case(
        "The heart is {sev} enlarged. Pulmonary vascularity is normal. No focal consolidation.",
        "{sev} cardiomegaly.",
        "cardiomegaly",
        sev="mildly",
    ),
    case(
        "{time} {sev} cardiomegaly. No pleural effusion or pneumothorax. The lungs are clear.",
        "{time} {sev} cardiomegaly. No acute pulmonary disease.",
        "cardiomegaly",
        time="stable",
        sev="moderate",
    ),
    case(
        "Cardiomegaly with {sev} interstitial edema. {side} pleural effusions.",
        "Cardiomegaly with {sev} pulmonary edema and {side} pleural effusions.",
        "pulmonary edema",
        sev="mild",
        side="bilateral",
        acute=True,
    ),
    case(
        "{time} pulmonary vascular congestion. Heart size is enlarged. No pneumothorax.",
        "{time} pulmonary vascular congestion and cardiomegaly.",
        "pulmonary vascular congestion",
        time="increased",
        acute=True,
    ),
    # nodules, masses, metastases
    case(
        "There is a {num} nodule in the {side} {zone}. The lungs are otherwise clear. Heart size normal.",
        "{num} {side} {zone} nodule.",
        "nodule",
        num="8 mm",
        side="right",
        zone="upper lobe",
    ),
    case(
        "{time} {num} nodule in the {side} {zone}. No pleural effusion.",
        "{time} {num} {side} {zone} nodule.",
        "nodule",
        time="stable",
        num="6 mm",
        side="left",
        zone="lower lobe",
    ),
    case(
        "{side} hilar mass measuring {num}. No pleural effusion. Heart size normal.",
        "{side} hilar mass measuring {num}, suspicious for malignancy.",
        "hilar mass",
        side="right",
        num="4.2 cm",
    ),
    case(
        "Multiple {side} pulmonary nodules, the largest measuring {num} in the {zone}.",
        "Multiple {side} pulmonary nodules, {hedge} metastases.",
        "pulmonary nodules",
        side="bilateral",
        num="1.5 cm",
        zone="lower lobes",
        hedge="likely",
    ),
    case(
        "{time} calcified granuloma in the {side} {zone}. The lungs are otherwise clear.",
        "{time} calcified granuloma in the {side} {zone}. No acute disease.",
        "granuloma",
        time="stable",
        side="right",
        zone="upper lobe",
        acute=False,
    ),
    case(
        "{side} {zone} mass measuring {num}. {side} pleural effusion.",
        "{side} {zone} mass measuring {num} with {side} pleural effusion.",
        "mass",
        side="left",
        zone="upper lobe",
        num="3 cm",
    ),
    # numbers bound to a side
    case(
        "Right pleural effusion measures {num}. Left pleural effusion measures {num2}.",
        "Right pleural effusion measuring {num}, left pleural effusion measuring {num2}.",
        "pleural effusion",
        num="3 cm",
        num2="1 cm",
    ),
    case(
        "Right upper lobe nodule measures {num}. Left lower lobe nodule measures {num2}.",
        "Right upper lobe nodule {num}. Left lower lobe nodule {num2}.",
        "nodule",
        num="9 mm",
        num2="5 mm",
    ),
    # bones
    case(
        "{time} fracture of the {side} clavicle. The lungs are clear. Heart size normal.",
        "{time} {side} clavicle fracture.",
        "fracture",
        time="acute",
        side="left",
        acute=True,
    ),
    case(
        "{time} {side} rib fractures. No pneumothorax. The lungs are clear.",
        "{time} {side} rib fractures. No pneumothorax.",
        "rib fractures",
        time="healed",
        side="right",
    ),
    case(
        "{sev} compression deformity of a lower thoracic vertebral body, {time}. The lungs are clear.",
        "{sev} {time} lower thoracic compression deformity.",
        "compression deformity",
        sev="mild",
        time="chronic",
    ),
    case(
        "Degenerative changes of the thoracic spine. Heart size normal. The lungs are clear.",
        "No acute cardiopulmonary abnormality. Degenerative changes of the thoracic spine.",
        "pneumothorax",
        acute=False,
    ),
    # devices
    case(
        "{side} internal jugular central venous catheter with tip in the superior vena cava. "
        "No pneumothorax. The lungs are clear.",
        "{side} IJ central line in place. No pneumothorax.",
        "central line",
        side="right",
    ),
    case(
        "{side} chest wall pacemaker with leads in the right atrium and right ventricle. "
        "Heart size is normal. The lungs are clear.",
        "{side} pacemaker in place. No acute cardiopulmonary abnormality.",
        "pacemaker",
        side="left",
    ),
    case(
        "Endotracheal tube tip {num} above the carina. Enteric tube in the stomach. The lungs are clear.",
        "Endotracheal tube {num} above the carina. Enteric tube in the stomach.",
        "endotracheal tube",
        num="4 cm",
    ),
    # chronic lung disease
    case(
        "The lungs are hyperexpanded with {sev} emphysematous changes. No focal airspace disease.",
        "{sev} emphysema. No acute disease.",
        "emphysema",
        sev="severe",
    ),
    case(
        "{time} {side} apical pleural thickening. The lungs are otherwise clear.",
        "{time} {side} apical pleural thickening.",
        "pleural thickening",
        time="chronic",
        side="bilateral",
    ),
    case(
        "{sev} {side} {zone} interstitial opacities, {time}. No pleural effusion.",
        "{sev} {time} {side} {zone} interstitial opacities.",
        "interstitial opacities",
        sev="mild",
        time="unchanged",
        side="bilateral",
        zone="lower lobe",
    ),
    case(
        "Tortuous thoracic aorta. Heart size normal. The lungs are clear.",
        "Tortuous aorta. No acute cardiopulmonary abnormality.",
        "pneumothorax",
        acute=False,
    ),
    # hedged findings (certainty)
    case(
        "{hedge} small {side} pneumothorax. Heart size is normal.",
        "{hedge} small {side} pneumothorax.",
        "pneumothorax",
        hedge="possible",
        side="left",
    ),
    case(
        "Heart size is normal. {hedge} {side} {zone} consolidation.",
        "{hedge} {side} {zone} consolidation.",
        "consolidation",
        hedge="probable",
        side="right",
        zone="upper lobe",
    ),
    case(
        "Widened mediastinum, {hedge} aortic dissection. The lungs are clear.",
        "Widened mediastinum, {hedge} aortic dissection.",
        "aortic dissection",
        hedge="concerning for",
    ),
    case(
        "Subtle lucency under the {side} hemidiaphragm, {hedge} free air. The lungs are clear.",
        "{hedge} free air under the {side} hemidiaphragm.",
        "free air",
        hedge="possible",
        side="right",
    ),
    # the same findings in other words (synonyms and broader terms)
    case("The cardiac silhouette is enlarged. The lungs are clear.", "Cardiomegaly.", "cardiomegaly"),
    case(
        "No evidence of pneumothorax. The lungs are clear.", "No pneumothorax.", "pneumothorax", negative=True
    ),
    case(
        "Left lower lobe consolidation. No pleural effusion.",
        "Left lower lobe airspace disease.",
        "consolidation",
    ),
    case(
        "Filling defects in the {side} lower lobe pulmonary arteries. The lungs are clear.",
        "{side} lower lobe pulmonary emboli.",
        "pulmonary emboli",
        side="right",
    ),
    case(
        "Intimal flap in the descending thoracic aorta. No pleural effusion.",
        "Aortic dissection of the descending thoracic aorta.",
        "aortic dissection",
    ),
    case(
        "Lytic lesions in the {side} ribs. No pneumothorax.",
        "{side} lytic rib lesions, concerning for metastases.",
        "lytic lesions",
        side="left",
    ),
    case(
        "Hyperinflated lungs with flattened diaphragms. No focal consolidation.",
        "Hyperinflation. No acute cardiopulmonary abnormality.",
        "hyperinflation",
        acute=False,
    ),
    # normal studies
    *(case(findings, "{normal}", "pneumothorax", negative=True, normal="") for findings in NORMAL_FINDINGS),
    case(
        "No pneumothorax. Heart size is normal. The lungs are clear.",
        "No pneumothorax.",
        "pneumothorax",
        negative=True,
    ),
    case(
        "The heart is normal in size. No focal consolidation. No pleural effusion.",
        "No focal consolidation or effusion.",
        "consolidation",
        negative=True,
    ),
    case(
        "Heart size is normal. The lungs are clear. No evidence of pneumothorax or large effusion.",
        "Normal heart size. Clear lungs.",
        "cardiomegaly",
        negative=True,
    ),
)

#: Controlled edits of one slot: value -> the value that contradicts the findings.
SWAPS = {
    "side": {"right": "left", "left": "right", "bilateral": "right"},
    "sev": {
        "small": "large",
        "mild": "severe",
        "mildly": "markedly",
        "moderate": "small",
        "large": "small",
        "severe": "mild",
    },
    "zone": {
        "upper lobe": "lower lobe",
        "lower lobe": "upper lobe",
        "middle lobe": "upper lobe",
        "lower lobes": "upper lobes",
    },
    "time": {
        "stable": "new",
        "new": "stable",
        "improving": "worsening",
        "increased": "decreased",
        "acute": "healed",
        "healed": "acute",
        "chronic": "acute",
        "unchanged": "increased",
    },
    "num": {},
}
#: Paraphrases of one slot's value that keep the meaning (faithful variants).
PARAPHRASES = {
    "side": {"right": "right-sided", "left": "left-sided", "bilateral": "bilateral"},
    "sev": {
        "small": "trace",
        "mild": "small",
        "mildly": "mildly",
        "moderate": "moderate-sized",
        "large": "large",
        "severe": "marked",
    },
    "zone": {
        "upper lobe": "upper lung",
        "lower lobe": "lung base",
        "middle lobe": "middle lobe",
        "lower lobes": "lung bases",
    },
    "time": {
        "stable": "unchanged",
        "new": "newly developed",
        "improving": "improved",
        "increased": "worsening",
        "acute": "acute",
        "healed": "old",
        "chronic": "old",
        "unchanged": "stable",
    },
}
CATEGORY_OF_SLOT = {
    "side": "laterality",
    "sev": "severity",
    "zone": "location",
    "time": "time",
    "num": "numbers",
}


@dataclass(frozen=True)
class Probe:
    category: str
    findings: str
    impression: str
    #: True when the impression contradicts or goes beyond the findings (the guardrails must flag it).
    unfaithful: bool
    edit: str


def render(template: str, slots: dict[str, str]) -> str:
    """The template with its slots filled, spaces tidied and each sentence capitalised."""
    text = template.format(**slots)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,])", r"\1", text)
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _other_number(value: str) -> str:
    number, unit = value.split()
    changed = float(number) * 2 + 1
    shown = f"{changed:.1f}" if "." in number else f"{changed:.0f}"
    return f"{shown} {unit}"


def _category(case_: Case) -> str:
    slots = dict(case_.slots)
    for slot in ("zone", "num", "sev", "time", "side", "hedge"):
        if slot in slots:
            return "certainty" if slot == "hedge" else CATEGORY_OF_SLOT[slot]
    return "negation"


def probes_of(index: int, case_: Case) -> Iterator[Probe]:
    slots = dict(case_.slots)
    findings = render(case_.findings, slots)
    home = _category(case_)
    if case_.negative:
        for impression in NORMAL_IMPRESSIONS if "normal" in slots else (case_.impression,):
            yield Probe(
                "summary" if "normal" in slots else "negation", findings, render(impression, slots), False, ""
            )
        yield Probe("negation", findings, render(f"{case_.finding}.", {}), True, "asserted what is ruled out")
    else:
        yield Probe(home, findings, render(case_.impression, slots), False, "")
        plain = {slot: ("" if slot in ("sev", "time") else value) for slot, value in slots.items()}
        if plain != slots:
            yield Probe(home, findings, render(case_.impression, plain), False, "qualifiers dropped")
        if "hedge" not in slots and "num" not in slots and not case_.impression.startswith("{time}"):
            yield Probe("certainty", findings, render("possible " + case_.impression, slots), False, "hedged")
        yield Probe("negation", findings, render(f"no {case_.finding}.", {}), True, "finding ruled out")
        if case_.acute is not None:
            summary = "No acute cardiopulmonary abnormality."
            yield Probe("summary", findings, summary, case_.acute, "summarised as normal")
    original = render(case_.impression, slots)
    for slot, value in slots.items():
        paraphrase = PARAPHRASES.get(slot, {}).get(value)
        if paraphrase and paraphrase != value:
            same = render(case_.impression, {**slots, slot: paraphrase})
            if same != original:
                yield Probe(CATEGORY_OF_SLOT[slot], findings, same, False, f"{value}~{paraphrase}")
        if slot in ("num", "num2"):
            converted = render(case_.impression, {**slots, slot: _in_other_unit(value)})
            if converted != original:
                yield Probe("numbers", findings, converted, False, f"{value} in other unit")
        if slot == "hedge":
            edited = {**slots, "hedge": ""}
            yield Probe("certainty", findings, render(case_.impression, edited), True, "hedge removed")
            continue
        if slot in ("num", "num2"):
            for changed in _number_edits(slots, slot):
                edited_text = render(case_.impression, changed)
                if edited_text != original:
                    yield Probe("numbers", findings, edited_text, True, f"{slot} changed")
            continue
        swap = SWAPS.get(slot, {}).get(value)
        edited_text = render(case_.impression, {**slots, slot: swap}) if swap else original
        if edited_text != original:
            yield Probe(CATEGORY_OF_SLOT[slot], findings, edited_text, True, f"{value}->{swap}")
    if "sev" not in slots and not case_.negative and "side" in slots:
        sized = case_.impression.replace("{side}", "large {side}", 1)
        yield Probe("severity", findings, render(sized, slots), True, "size added")
    if "time" not in slots and not case_.negative and not case_.impression.startswith("No "):
        timed = "new " + case_.impression
        yield Probe("time", findings, render(timed, slots), True, "course added")
    new_to_findings = [a for a, words in ADDITIONS if not any(w in findings.lower() for w in words)]
    for offset in (0, 5):
        addition = new_to_findings[(index * 2 + offset) % len(new_to_findings)]
        impression = render(case_.impression, slots)
        yield Probe("unsupported", findings, f"{impression} {addition}", True, f"added {addition!r}")
    if case_.finding in ("consolidation", "airspace disease") and "zone" in slots and "hedge" not in slots:
        definite = "{side} {zone} pneumonia."
        yield Probe("diagnosis", findings, render(definite, slots), True, "pneumonia stated as certain")
        hedged = "{side} {zone} " + case_.finding + ", likely pneumonia."
        yield Probe("diagnosis", findings, render(hedged, slots), False, "pneumonia hedged")


def _in_other_unit(value: str) -> str:
    """The same length in the other unit ("8 mm" -> "0.8 cm", "1.5 cm" -> "15 mm")."""
    number, unit = value.split()
    if unit == "mm":
        return f"{float(number) / 10:g} cm"
    return f"{float(number) * 10:g} mm"


def _number_edits(slots: dict[str, str], slot: str) -> Iterator[dict[str, str]]:
    yield {**slots, slot: _other_number(slots[slot])}
    if "num2" in slots and slot == "num":
        # The two sides' values swapped: each value is in the findings, on the other side.
        yield {**slots, "num": slots["num2"], "num2": slots["num"]}


def probe_set() -> list[Probe]:
    """Every probe of every case, in a fixed order."""
    return [probe for index, case_ in enumerate(CASES) for probe in probes_of(index, case_)]
