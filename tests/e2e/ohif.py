"""The OHIF viewer as a test peer: its npm production build, served same-origin with Orthanc's DICOMweb.

* :func:`npm_package` fetches a package tarball from the npm registry with
  ``npm pack`` (Debian ``npm``) into a gitignored cache directory, once, and
  unpacks it; nothing is fetched at run time by the viewer itself.
  :func:`npm_install` does the same for a node project's packages.
* :class:`ViewerServer` serves the build's ``dist/`` with a single-page-app
  fallback (unknown paths get ``index.html``, as OHIF's router expects), our
  own ``app-config.js`` (the shipped one points at a public demo server on a
  CDN), and a same-origin proxy ``/dicom-web/`` -> Orthanc's DICOMweb plugin,
  so the browser needs no CORS and talks to loopback only.

Importable without pytest (no fixtures here).
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import tarfile
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: Gitignored cache for npm tarballs and what they unpack to.
NPM_CACHE = REPO / ".cache" / "npm"
OHIF_PACKAGE = "@ohif/app@3.13.2"

#: Headers a proxy must not forward (RFC 9110 7.6.1) plus those it recomputes.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def npm_package(spec: str, cache: Path = NPM_CACHE) -> Path:
    """The unpacked ``package/`` of ``spec`` (e.g. ``@ohif/app@3.13.2``), packed once into ``cache``.

    Raises RuntimeError with npm's output when the registry cannot be reached.
    """
    target = cache / spec.replace("/", "+")
    package = target / "package"
    if (package / "package.json").is_file():
        return package
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found; install the Debian package npm (scripts/test does)")
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "pack", spec, "--silent", "--pack-destination", str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tarballs = sorted(target.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        raise RuntimeError(f"npm pack {spec} failed ({done.returncode}): {done.stderr[-2000:]}")
    staging = target / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tarballs[-1]) as archive:
        archive.extractall(staging, filter="data")
    (staging / "package").rename(package)
    staging.rmdir()
    return package


def npm_install(specs: tuple[str, ...], project: Path) -> Path:
    """``project``, a node project with ``specs`` installed from the npm registry (once)."""
    marker = project / ".installed"
    wanted = "\n".join(specs)
    if marker.is_file() and marker.read_text() == wanted:
        return project
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found; install the Debian package npm (scripts/test does)")
    project.mkdir(parents=True, exist_ok=True)
    (project / "package.json").write_text('{"private": true, "type": "module"}\n')
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", *specs],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=project,
    )
    if done.returncode != 0:
        raise RuntimeError(f"npm install {' '.join(specs)} failed ({done.returncode}): {done.stderr[-2000:]}")
    marker.write_text(wanted)
    return project


def app_config(origin: str) -> str:
    """OHIF's ``window.config``: one DICOMweb data source at ``origin``/dicom-web, nothing else."""
    root = f"{origin}/dicom-web"
    config: dict[str, Any] = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (test)",
                    "name": "orthanc",
                    "wadoUriRoot": root,
                    "qidoRoot": root,
                    "wadoRoot": root,
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "singlepart": "bulkdata,video",
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class ViewerServer:
    """Serve an OHIF ``dist/`` on a loopback port, with the SPA fallback and the DICOMweb proxy."""

    def __init__(
        self, dist: Path, dicomweb_host: str, dicomweb_port: int, dicomweb_root: str = "/dicom-web/"
    ):
        self.dist = dist
        self.upstream = (dicomweb_host, dicomweb_port, dicomweb_root.rstrip("/"))
        self.requests: list[tuple[str, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        assert self._server is not None, "ViewerServer not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ViewerServer:
        viewer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(viewer.dist), **kwargs)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._route()

            def do_HEAD(self) -> None:  # noqa: N802
                self._route()

            def do_POST(self) -> None:  # noqa: N802
                self._route()

            def _route(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if path == "/dicom-web" or path.startswith("/dicom-web/"):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, "application/javascript", app_config(viewer.origin).encode())
                elif path == "/sw.js" or path == "/init-service-worker.js":
                    # No service worker: every request must reach this server, where the test sees it.
                    self._send(200, "application/javascript", b"")
                elif self.command == "POST":
                    self._send(405, "text/plain", b"read-only")
                elif path != "/" and (viewer.dist / path.lstrip("/")).is_file():
                    super().do_GET() if self.command == "GET" else super().do_HEAD()
                else:  # the single-page app's own routes (/viewer, /segmentation ...)
                    self._send(200, "text/html", (viewer.dist / "index.html").read_bytes())

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                host, port, root = viewer.upstream
                target = root + self.path[len("/dicom-web") :]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                connection = http.client.HTTPConnection(host, port, timeout=60)
                try:
                    connection.request(self.command, target, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                finally:
                    connection.close()
                viewer.requests.append((self.path, response.status))
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
