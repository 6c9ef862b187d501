"""Synthetic DICOM data with known ground truth, for tests, benchmarks and demos."""

from pacs_ai.synthetic.phantom import PhantomTruth, write_chest_phantom

__all__ = ["PhantomTruth", "write_chest_phantom"]
