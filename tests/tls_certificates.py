"""Throwaway TLS certificates for DICOM TLS tests, made with the openssl command: a CA and leaves it signs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    certificate: Path
    key: Path


def certificate_authority(directory: Path, name: str = "test-ca") -> Pair:
    """A self-signed CA certificate and key."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(pair.key), "-out", str(pair.certificate),
    )  # fmt: skip
    return pair


def issue(ca: Pair, directory: Path, common_name: str, *, server: bool, client_too: bool = False) -> Pair:
    """A certificate for ``common_name`` signed by ``ca``: a server's (IP 127.0.0.1) or a client's.

    ``client_too``: a server's that may also be a client's (a PACS that answers C-MOVE over TLS and
    opens the C-STORE sub-operations over TLS with the same certificate).
    """
    pair = Pair(directory / f"{common_name}.crt", directory / f"{common_name}.key")
    request = directory / f"{common_name}.csr"
    extensions = directory / f"{common_name}.ext"
    extensions.write_text(
        "basicConstraints=CA:FALSE\n"
        + (
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth{',clientAuth' if client_too else ''}\n"
            if server
            else "extendedKeyUsage=clientAuth\n"
        ),
        encoding="ascii",
    )
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
        "-keyout", str(pair.key), "-out", str(request),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.certificate), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(pair.certificate),
    )  # fmt: skip
    return pair
