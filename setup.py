"""The package's long description for PyPI: README.md with its links made absolute.

Everything else is in pyproject.toml. The README links to docs/, figures and LICENSE relatively,
which is right on GitHub and in a checkout but leads nowhere on PyPI's project page, where only
the text travels: there they point into the repository instead (figures to their raw files, so
that they show).
"""
from __future__ import annotations

import re
from pathlib import Path

REPOSITORY = "https://github.com/CoreDiffSlicer/CoreDiffSlicer"
FILES = f"{REPOSITORY}/blob/main/"
RAW_FILES = "https://raw.githubusercontent.com/CoreDiffSlicer/CoreDiffSlicer/main/"

# a markdown link or image whose target is a path in the repository (no scheme, no #anchor)
_RELATIVE_LINK = re.compile(r"(!?)\[([^\]]*)\]\((?![a-zA-Z][a-zA-Z0-9+.-]*:|#|/)([^)\s]+)\)")


def pypi_readme(text: str) -> str:
    """``text`` with every relative link pointing into the repository on GitHub."""
    def absolute(match: re.Match) -> str:
        image, label, target = match.groups()
        return f"{image}[{label}]({(RAW_FILES if image else FILES) + target})"
    return _RELATIVE_LINK.sub(absolute, text)


if __name__ == "__main__":  # as setuptools runs it
    from setuptools import setup

    setup(long_description=pypi_readme((Path(__file__).parent / "README.md").read_text(encoding="utf-8")),
          long_description_content_type="text/markdown")
