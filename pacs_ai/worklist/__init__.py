"""The radiologist worklist: review AI report drafts, accept (with edits) or reject them.

:func:`create_app` builds the FastAPI application; :mod:`pacs_ai.report.records`
holds the operations the pipeline and the pages share (record a draft, sign
it, reject it); :mod:`pacs_ai.worklist.users` manages the people who log in.
"""

from pacs_ai.worklist.app import WorklistOptions, create_app

__all__ = ["WorklistOptions", "create_app"]
