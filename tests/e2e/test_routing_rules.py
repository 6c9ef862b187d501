"""Routing rules end to end: two series of one study go to two profiles, originals to a second PACS.

Orthanc "PACS" receives the SEG and SR of both series; Orthanc "ARCHIVE"
receives the original instances of the first series only; a webhook hears
about the second; a shadow rule is recorded but changes nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom
from tests.e2e.test_chest_ct_roundtrip import COMPREHENSIVE_3D_SR, DRAFT_REPORT_SR, SEG_STORAGE
from tests.peers import OrthancServer, storescu, wait_for

pytestmark = pytest.mark.e2e

PROFILE = """
name: {name}
match: {{modality: [CT], min_instances: 10}}
analyzers: [{{name: ct-chest-lung}}]
destinations: {destinations}
"""

RULES = """
rules:
  - name: thorax-a
    when:
      all:
        - {{attribute: SeriesDescription, regex: "Thorax A$"}}
        - {{calling_ae: [CT_SCANNER]}}
        - {{peer_address: ["127.0.0.0/8"]}}
    actions: [{{process: lung-a}}, {{forward_originals: [archive]}}]
  - name: thorax-b
    when: {{attribute: SeriesDescription, regex: "Thorax B$"}}
    actions: [{{process: lung-b}}, {{forward_results: [pacs]}}, {{notify: "{webhook}"}}]
    priority: stat
  - name: trial-archive-everything
    shadow: true
    when: {{attribute: Modality, equals: CT}}
    actions: [{{forward_originals: [archive]}}]
  - name: rest
    fallback: true
    actions: [{{discard: "no AI service for this series"}}]
"""


class Webhook:
    """A loopback HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def two_series_study(root: Path) -> tuple[PhantomTruth, PhantomTruth]:
    first = write_chest_phantom(root / "a", slices=24, size=256, slice_spacing_mm=10.0, seed=1)
    second = write_chest_phantom(
        root / "b",
        slices=24,
        size=256,
        slice_spacing_mm=10.0,
        seed=2,
        study_uid=first.study_uid,
        series_uid=generate_uid(),
        accession_number=first.accession_number,
    )
    for truth, description in ((first, "Thorax A"), (second, "Thorax B")):
        for path in truth.paths:
            dataset = pydicom.dcmread(path)
            dataset.SeriesDescription = description
            dataset.save_as(path)
    return first, second


def test_two_series_two_profiles_originals_to_an_archive(
    service_factory: Any, tmp_path: Path, webhook: Webhook
) -> None:
    first, second = two_series_study(tmp_path / "study")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "lung-a.yaml").write_text(PROFILE.format(name="lung-a", destinations="[pacs]"))
    (profiles / "lung-b.yaml").write_text(PROFILE.format(name="lung-b", destinations="[]"))
    (profiles / "rules.yaml").write_text(RULES.format(webhook=webhook.url))

    with OrthancServer(aet="PACS") as pacs, OrthancServer(aet="ARCHIVE") as archive:
        destinations = {
            name: {"ae_title": server.aet, "host": server.host, "port": server.dicom_port, "max_retries": 3}
            for name, server in (("pacs", pacs), ("archive", archive))
        }
        service = service_factory(profiles_dir=profiles, destinations=destinations)
        for truth in (first, second):
            sent = storescu(
                "127.0.0.1", service.port, service.ae_title, truth.paths, calling_aet="CT_SCANNER"
            )
            assert sent.returncode == 0, sent.stderr

        def results_in_pacs() -> list[str] | None:
            # (The AI report draft, an Enhanced SR, may come too; test_report_pipeline checks it.)
            classes = [
                c
                for s in pacs.series_of_study(first.study_uid)
                for c in s["SOPClassUIDs"]
                if c != DRAFT_REPORT_SR
            ]
            return (
                classes
                if sorted(classes) == sorted([SEG_STORAGE, SEG_STORAGE] + [COMPREHENSIVE_3D_SR] * 2)
                else None
            )

        wait_for(results_in_pacs, timeout=240, interval=1.0, description="SEG and SR of both series in PACS")
        archived = wait_for(
            lambda: [
                s for s in archive.series_of_study(first.study_uid) if len(s["Instances"]) == len(first.paths)
            ],
            timeout=120,
            description="the first series' originals in the archive",
        )
        assert [s["SeriesInstanceUID"] for s in archived] == [first.series_uid]
        assert [s["SeriesInstanceUID"] for s in archive.series_of_study(first.study_uid)] == [
            first.series_uid
        ]

    jobs = dict(service.query("SELECT rule, routing_priority FROM jobs WHERE analyzer = 'ct-chest-lung'"))
    assert jobs == {"thorax-a": "routine", "thorax-b": "stat"}
    series = dict(service.query("SELECT series_instance_uid, peer_address FROM series"))
    assert set(series.values()) == {"127.0.0.1"}
    [forward] = service.query("SELECT state, instance_count FROM jobs WHERE analyzer = 'forward'")
    assert tuple(forward) == ("SUCCEEDED", len(first.paths))

    [payload] = wait_for(lambda: webhook.received, timeout=30, description="the webhook call")
    assert payload["series_instance_uid"] == second.series_uid and payload["rule"] == "thorax-b"
    assert payload["priority"] == "stat" and payload["profiles"] == ["lung-b"]
    assert "Phantom" not in json.dumps(payload), "patient names never leave in notifications"
    shadow = service.query("SELECT object_uid, detail FROM audit_events WHERE action = 'rule.shadow'")
    assert len(shadow) == 2 and all("trial-archive-everything" in str(detail) for _, detail in shadow)
