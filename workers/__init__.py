"""Celery application and tasks of pacs-ai (``celery -A workers.app worker``)."""
