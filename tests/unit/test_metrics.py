"""pacs_ai.metrics: the processes of a host count together, dead ones' gauges go, the exporter serves.

prometheus-client picks multiprocess mode when first imported, so each case runs in
a fresh interpreter (about a second), as the listener, worker and worklist
processes do.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.service import REPO_ROOT

HOST_PROCESSES = textwrap.dedent(
    """
    import json, multiprocessing, os, sys, urllib.request
    from pathlib import Path
    from pacs_ai import metrics

    directory, taken_port = Path(sys.argv[1]), int(sys.argv[2])
    (directory / "counter_4242.db").write_bytes(b"left by a previous start")
    assert metrics.use_directory(directory, clean=True)
    assert not (directory / "counter_4242.db").exists()

    def listener(index):
        metrics.instance_stored("CT_1", 1000, 0.01)
        metrics.association_rejected("low-disk")
        metrics.processes_running({"listener": index})

    children = [multiprocessing.get_context("fork").Process(target=listener, args=(i,)) for i in (1, 2)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    before = metrics.exposition()[0].decode()
    for child in children:
        metrics.mark_process_dead(child.pid)
    after = metrics.exposition()[0].decode()

    refused = metrics.start_exporter("127.0.0.1", taken_port)
    exporter = metrics.start_exporter("127.0.0.1", 0)
    scraped = urllib.request.urlopen(exporter.url, timeout=10).read().decode()
    exporter.stop()
    print(json.dumps({"before": before, "after": after, "refused": refused is None, "scraped": scraped}))
    """
)


def run_host(tmp_path: Path) -> dict[str, Any]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-c", HOST_PROCESSES, str(tmp_path / "metrics"), str(taken.getsockname()[1])],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env={"PATH": "/usr/bin:/bin"},
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    result["log"] = done.stderr
    return result


def test_processes_of_a_host_add_up_and_dead_ones_gauges_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    result = run_host(tmp_path)
    before, after = result["before"], result["after"]
    # Two processes, one instance each: the exporter adds them up.
    assert 'pacs_ai_ingest_instances_total{calling_ae="CT_1"} 2.0' in before
    assert 'pacs_ai_ingest_bytes_total{calling_ae="CT_1"} 2000.0' in before
    assert 'pacs_ai_associations_rejected_total{reason="low-disk"} 2.0' in before
    assert 'pacs_ai_processes{role="listener"}' in before
    # Once marked dead, their live gauge is gone; what they counted stays counted.
    assert 'pacs_ai_processes{role="listener"}' not in after
    assert 'pacs_ai_ingest_instances_total{calling_ae="CT_1"} 2.0' in after
    # A port already taken: no exporter, a log line naming the settings; else /metrics over HTTP.
    assert result["refused"] and "metrics_port" in result["log"]
    assert 'pacs_ai_ingest_instances_total{calling_ae="CT_1"} 2.0' in result["scraped"]
