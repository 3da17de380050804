"""Tests mirror the package. Paths shared by the test modules:"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The MiniMind2 tokenizer beside the repository (../shared), else the identical copy the package
# ships (minimind/convert/minimind2_tokenizer): a clone alone runs the tests that need it.
_SHARED = REPO.parent / "shared" / "reference" / "minimind2"
REFERENCE = _SHARED if _SHARED.is_dir() else REPO / "minimind" / "convert" / "minimind2_tokenizer"
