"""How the listener names itself to its peers and in the files it writes (PS3.7 D.3.3.2).

The Implementation Class UID and Version Name are pacs-ai's own, not those of
pynetdicom, whose PDU classes the listener uses: a site's conformance records
and a peer's logs must name the implementation that actually answered.
"""

from __future__ import annotations

from pacs_ai import __version__

#: pacs-ai's Implementation Class UID: a UUID-derived UID (PS3.5 B.2), fixed for the project.
IMPLEMENTATION_CLASS_UID = "2.25.158217961138775295590216486769753429892"
#: Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"PACS_AI_{__version__}"[:16]
