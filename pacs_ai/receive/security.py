"""Who may talk to the listener, and over what: known peers and DICOM TLS (PS3.15 B.1).

An AE title is a name, not a credential.  A site names its known peers
(:class:`KnownPeer`: AE title, the networks it calls from and, over TLS, the
subject of its client certificate); once any is named, every other caller is
refused at association (A-ASSOCIATE-RJ).  The TLS layer is Python's
:mod:`ssl` wrapping the accepted socket; this module holds only the settings
and the checks, the listener (:mod:`pacs_ai.receive.server`) applies them.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pacs_ai.peer_settings import KnownPeer, ListenerTls

#: Addresses whose callers can only be processes of this machine.
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def server_tls_context(tls: ListenerTls) -> ssl.SSLContext:
    """The listener's TLS context: TLS 1.2 or later, client certificates required when a CA is set."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate_file, tls.private_key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def certificate_subject(certificate: Mapping[str, Any] | None) -> str | None:
    """A peer certificate's subject as ``CN=..,O=..`` (as ``ssl.getpeercert`` gives it), or None."""
    if not certificate:
        return None
    subject = certificate.get("subject", ())
    parts = []
    for relative_name in subject:
        for key, value in relative_name:
            parts.append(f"{_SHORT_NAMES.get(key, key)}={value}")
    return ",".join(parts)


_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


@dataclass(frozen=True)
class PeerRefusal:
    """Why a caller is not a known peer; ``unknown_ae`` picks the A-ASSOCIATE-RJ diagnostic."""

    reason: str
    unknown_ae: bool


def check_known_peer(
    peers: tuple[KnownPeer, ...], calling_ae: str, address: str | None, subject: str | None
) -> PeerRefusal | None:
    """None when the caller is one of ``peers`` (or none are named), else why it is refused."""
    if not peers:
        return None
    named = [peer for peer in peers if peer.ae_title == calling_ae]
    if not named:
        return PeerRefusal(f"calling AE title {calling_ae!r} is not a known peer", unknown_ae=True)
    if matching_peer(peers, calling_ae, address, subject) is not None:
        return None
    return PeerRefusal(
        f"known peer {calling_ae!r} called from {address} with certificate subject {subject!r}, "
        "which its entry does not allow",
        unknown_ae=False,
    )


def matching_peer(
    peers: tuple[KnownPeer, ...], calling_ae: str, address: str | None, subject: str | None
) -> KnownPeer | None:
    """The first of ``peers`` whose entry the caller matches (AE title, network, certificate), or None."""
    for peer in peers:
        if peer.ae_title != calling_ae:
            continue
        if peer.networks and not _in_networks(address, peer.networks):
            continue
        if peer.certificate_subject is not None and _normal(peer.certificate_subject) != _normal(subject):
            continue
        return peer
    return None


def _in_networks(address: str | None, networks: list[str]) -> bool:
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(network, strict=False) for network in networks)


def _normal(subject: str | None) -> str | None:
    return None if subject is None else ",".join(part.strip() for part in subject.split(","))


def open_listener_warning(listen_host: str, known_peers: list[KnownPeer]) -> str | None:
    """Why the listener's exposure deserves a loud warning, or None.

    Shared by ``pacs-ai serve`` and ``pacs-ai status``: with no known peers
    named, a listener bound to a non-loopback address stores what anyone on
    the network sends it.
    """
    if known_peers or listen_host in _LOOPBACK_HOSTS or listen_host.startswith("127."):
        return None
    return (
        f"the DICOM listener on {listen_host} accepts associations from ANY caller: no known_peers are "
        "named (set known_peers, or listen_host to 127.0.0.1)"
    )
