"""The one error every sender raises when a send did not succeed."""

from __future__ import annotations


class DeliveryError(Exception):
    """A send failed; ``status`` is the peer's DICOM or HTTP status, or None when there was no answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
