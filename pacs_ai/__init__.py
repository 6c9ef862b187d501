"""pacs-ai: a PACS-integrated AI pipeline for radiology departments.

The package layout follows the data's path: ``receive`` (DICOM listener and
spool), ``index`` (the database of record), ``route`` (profiles, study
assembly), ``analyze`` (volumes and analyzers), ``encode`` (DICOM SEG/SR),
``dispatch`` (sending results to the PACS) and ``cli``.
"""

__version__ = "0.1.0"
