"""What the two S3 clients share: where a key's object lives and S3's own limits and answers.

:class:`S3Objects` is the base of :class:`~pacs_ai.storage.s3.S3Storage`
(boto3) and :class:`~pacs_ai.storage.s3_obstore.ObstoreS3Storage` (obstore):
it reads ``storage_url`` (``s3://bucket/optional/prefix``), names each key's
object under the prefix, and cuts a deletion into DeleteObjects-sized batches,
so both clients agree on every object's name and on how keys are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from pacs_ai.config import Settings
from pacs_ai.storage.base import check_key

__all__ = ["S3Objects", "DELETE_BATCH", "MIB", "CREDENTIAL_CODES", "NO_CREDENTIALS"]

#: Keys one DeleteObjects request may name (S3's limit).
DELETE_BATCH = 1000
MIB = 1024 * 1024
#: Error codes of S3 (and its imitations) meaning the credentials were refused.
CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
)
#: What to set when no credentials were found anywhere.
NO_CREDENTIALS = (
    "no credentials (set storage_s3_access_key_id and storage_s3_secret_access_key, "
    "storage_s3_credentials_file, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
)


class S3Objects:
    """The bucket and prefix of ``storage_url`` and the object name of each key."""

    def __init__(self, settings: Settings) -> None:
        url = urlsplit(settings.storage_url or "")
        if url.scheme != "s3" or not url.netloc:
            raise ValueError(f"storage_url {settings.storage_url!r} is not s3://bucket[/prefix]")
        self.bucket = url.netloc
        self.prefix = url.path.strip("/")
        endpoint = settings.storage_s3_endpoint_url
        #: The store as messages name it (never with credentials).
        self.description = f"s3://{self.bucket}/{self.prefix}" + (f" at {endpoint}" if endpoint else "")
        #: What every object name starts with: the prefix and its slash, or nothing.
        self.start = f"{self.prefix}/" if self.prefix else ""

    def _object(self, key: str) -> str:
        check_key(key)
        return self.start + key

    def local_path(self, key: str) -> None:
        """None: an object in the store has no path on this host."""
        return None

    def _deletion_batches(self, keys: Iterable[str], refused: dict[str, str]) -> Iterator[dict[str, str]]:
        """``{object name: key}`` of at most :data:`DELETE_BATCH` keys at a time, each key once.

        A key that is not a valid key goes into ``refused`` with the reason
        instead (the caller reports those as not removed).
        """
        pending = list(dict.fromkeys(keys))
        for first in range(0, len(pending), DELETE_BATCH):
            names: dict[str, str] = {}
            for key in pending[first : first + DELETE_BATCH]:
                try:
                    names[self._object(key)] = key
                except ValueError as exc:
                    refused[key] = str(exc)
            if names:
                yield names
