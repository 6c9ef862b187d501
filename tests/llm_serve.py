"""``transformers serve``: an OpenAI-compatible model server we did not write, started for the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import free_port


@contextlib.contextmanager
def transformers_serve(model_dir: Path | None, *, trust_remote_code: bool = False) -> Iterator[str]:
    """``transformers serve`` of ``model_dir`` on 127.0.0.1 (OpenAI-compatible, not ours): its /v1 URL.

    Without ``model_dir`` the server loads whichever model directory a request names.
    """
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("the transformers CLI is not installed (pip install 'transformers[serving]')")
    port = free_port()
    # One torch thread: tiny models gain nothing from more, and on a busy CI machine two threads made
    # each generation step many times slower.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [executable, "serve", *([str(model_dir)] if model_dir else []), "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    command += ["--device", "cpu", *(["--trust-remote-code"] if trust_remote_code else [])]
    # Its output goes to a file: a pipe nobody reads would block a server that lives for the session.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    log.seek(0)
                    output = log.read().decode("utf-8", "replace")
                    pytest.fail(f"transformers serve did not come up:\n{output[-3000:]}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
