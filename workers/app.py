"""The application the ``celery`` command line loads: ``celery -A workers.app worker``.

Settings come from the environment (``PACS_AI_*``, ``PACS_AI_CONFIG_FILE``, or
the resolved settings ``pacs-ai serve`` hands its workers).
"""

from pacs_ai.config import load_settings
from workers.factory import create_app

app = create_app(load_settings())
