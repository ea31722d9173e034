"""The documentation builds strictly (no broken link, missing page or unknown anchor), and the
READMEs that MkDocs does not see (the repository's, each package's) link only to what exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[2]
READMES = [
    ROOT / "README.md",
    ROOT / "python" / "shared" / "README.md",
    ROOT / "python" / "ollama-worker" / "README.md",
    ROOT / "python" / "infer" / "README.md",
]
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.M)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    assert (tmp_path / "index.html").is_file()


def test_every_doubtful_link_is_a_warning() -> None:
    """Strict mode fails only on warnings: the link checks must stay at that level."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    assert config["docs_dir"] == "docs"
    validation = config["validation"]
    assert set(validation["nav"].values()) == {"warn"}
    assert validation["links"] == {
        "not_found": "warn",
        "anchors": "warn",
        "absolute_links": "warn",
        "unrecognized_links": "warn",
    }


def _anchors(page: Path) -> set[str]:
    """The ids MkDocs gives ``page``'s headings (the ``toc`` extension's default slugs)."""
    text = _FENCE.sub("", page.read_text())
    return {slugify(re.sub(r"[`*]", "", title), "-") for title in _HEADING.findall(text)}


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_links_point_at_what_exists(readme: Path) -> None:
    broken = []
    for target in _LINK.findall(_FENCE.sub("", readme.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        page = (readme.parent / path).resolve() if path else readme
        if not page.exists():
            broken.append(f"{target}: no such file")
        elif anchor and page.suffix == ".md" and anchor not in _anchors(page):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{readme.relative_to(ROOT)}: " + ", ".join(broken)
