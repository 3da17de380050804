"""Tests mirror the package. Paths shared by the test modules:"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The MiniMind2 tokenizer beside the repository (../shared); tests that need it skip without it.
REFERENCE = REPO.parent / "shared" / "reference" / "minimind2"
