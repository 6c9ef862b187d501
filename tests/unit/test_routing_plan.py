"""What the rules that apply to a series add up to (plan_series), without a database."""

from __future__ import annotations

from pacs_ai.route.plan import describe_actions, plan_series
from pacs_ai.route.profiles import Profile, SeriesFacts
from pacs_ai.route.rules import RoutingFacts, Rule, evaluate_rules

FACTS = RoutingFacts({"Modality": "CT", "SeriesDescription": "Thorax A"}, calling_ae_title="CT1")
SERIES = SeriesFacts("CT", "CHEST", "Thorax A", "1.2.840.10008.5.1.4.1.1.2", "ORIGINAL\\PRIMARY", 1.0, 60)


def profile(name: str, **match: object) -> Profile:
    return Profile.model_validate(
        {"name": name, "match": match or {"modality": ["CT"]}, "analyzers": [{"name": "ct-chest-lung"}]}
    )


def rule(name: str, actions: list[dict[str, object]], **fields: object) -> Rule:
    fields.setdefault("when", {"attribute": "Modality", "equals": "CT"})
    return Rule.model_validate({"name": name, "actions": actions, **fields})


def test_actions_of_all_applying_rules_combine() -> None:
    rules = [
        rule("lungs", [{"process": "lung"}, {"forward_results": ["pacs"]}]),
        rule(
            "archive",
            [{"forward_originals": ["archive", "vna"]}, {"notify": "http://ris/hook"}],
            priority="stat",
        ),
        rule("lungs-again", [{"process": "lung"}, {"forward_results": ["pacs", "research"]}]),
        rule("mr-only", [{"process": "other"}], when={"attribute": "Modality", "equals": "MR"}),
    ]
    plan = plan_series(evaluate_rules(rules, FACTS), [profile("lung"), profile("other")], SERIES)
    assert [(step.profile.name, step.rule) for step in plan.process] == [("lung", "lungs")]
    assert plan.result_destinations == ["pacs", "research"]
    assert plan.originals == {"archive": "archive", "vna": "archive"}
    assert plan.notify == [("http://ris/hook", "archive")]
    assert plan.priority == "stat"  # the most urgent of the rules that apply
    assert plan.discard is None and plan.does_anything


def test_profile_input_requirements_still_apply() -> None:
    rules = [rule("lungs", [{"process": "lung"}]), rule("ghost", [{"process": "missing"}])]
    thin_only = profile("lung", modality=["CT"], slice_thickness={"max": 0.5})
    plan = plan_series(evaluate_rules(rules, FACTS), [thin_only], SERIES)
    assert plan.process == []
    assert any("input requirements of profile lung" in problem for problem in plan.problems)
    assert any("profile 'missing' does not exist" in problem for problem in plan.problems)
    assert not plan.does_anything


def test_discard_and_shadow_rules() -> None:
    rules = [
        rule("trial", [{"process": "lung"}], shadow=True, priority="off-peak"),
        Rule.model_validate({"name": "rest", "fallback": True, "actions": [{"discard": "no AI for this"}]}),
    ]
    plan = plan_series(evaluate_rules(rules, FACTS), [profile("lung")], SERIES)
    assert plan.discard == ("rest", "no AI for this")
    assert plan.process == [] and plan.priority == "routine"
    assert plan.shadow == ["shadow rule trial would: process with profile lung [priority off-peak]"]


def test_describe_actions() -> None:
    described = describe_actions(
        rule("r", [{"forward_originals": ["a"]}, {"forward_results": ["b"]}, {"notify": "https://x/y"}])
    )
    assert described == "forward originals to a; forward results to b; notify https://x/y [priority routine]"
