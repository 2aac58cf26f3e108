"""The project documents itself: the site in docs/ builds without a warning, the README's links lead somewhere, and
nothing points at a design document a clone does not have.

``mkdocs build --strict`` fails on a link to a missing page or anchor, an absolute link, and a page that is not in
the navigation (mkdocs.yml turns each of those into a warning). The last test shows every check failing on a
small tree.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# written in two parts, so that this file does not match itself
FORBIDDEN = (".." + "/shared", "DESIGN" + ".md")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SKIPPED_TREES = {".git", "var", "media", "node_modules", "__pycache__", ".venv"}


def build_site(root: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
                          cwd=root, capture_output=True, text=True)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs both make it for plain headings: lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text)).strip("-")


def anchors(markdown: str) -> set[str]:
    found, fence = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def broken_links(readme: Path) -> list[str]:
    """The README's links to files of the repository (and to headings in them) that lead nowhere."""
    problems, fence = [], False
    for number, line in enumerate(readme.read_text().splitlines(), start=1):
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (readme.parent / path).resolve() if path else readme
            if not file.exists():
                problems.append(f"{readme.name}:{number} links to {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                problems.append(f"{readme.name}:{number} links to {target}: no such heading")
    return problems


def text_files(root: Path) -> list[Path]:
    """The files git tracks or would track (untracked files that are not ignored count: they are about to be
    committed); every file outside the runtime folders where git is not at hand."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        paths = [root / name for name in listed.stdout.split("\0") if name]
    else:
        paths = [p for p in root.rglob("*") if not SKIPPED_TREES & set(p.relative_to(root).parts)]
    return [p for p in paths if p.is_file() and not p.is_symlink()]


def mentions(root: Path, needles=FORBIDDEN) -> list[str]:
    found = []
    for path in text_files(root):
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for needle in needles:
            if needle in text:
                found.append(f"{path.relative_to(root)} mentions {needle}")
    return sorted(found)


def test_the_documentation_site_builds_without_a_warning(tmp_path):
    run = build_site(REPO, tmp_path / "site")
    assert run.returncode == 0, f"mkdocs build --strict (mkdocs.yml) failed:\n{run.stdout}{run.stderr}"
    assert (tmp_path / "site" / "method" / "index.html").exists()


def test_every_page_in_docs_is_in_the_navigation():
    listed = set(re.findall(r":\s*\"?([\w./-]+\.md)\"?\s*$", (REPO / "mkdocs.yml").read_text(), re.MULTILINE))
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "mkdocs.yml's nav lists pages that do not exist"


def test_the_readmes_links_lead_to_files_of_the_repository():
    assert broken_links(REPO / "README.md") == []


def test_the_readme_keeps_the_test_command_ci_runs():
    # .ci/run and the Makefile run "make test" as README.md's test command
    assert re.search(r"^make test\b", (REPO / "README.md").read_text(), re.MULTILINE)


def test_nothing_points_at_a_design_document_outside_the_repository():
    assert mentions(REPO) == []


def test_the_checks_fail_on_a_broken_link_a_missing_page_and_a_stray_reference(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "mkdocs.yml").write_text((REPO / "mkdocs.yml").read_text().split("\nnav:")[0]
                                     + "\nnav:\n  - Home: index.md\n")
    (root / "docs" / "index.md").write_text("# Home\n\n## Part one\n\nSee [part one](#part-one).\n")
    (root / "docs" / "other.md").write_text("# Other\n")
    (root / "README.md").write_text("# Read me\n\n[home](docs/index.md#part-one), [gone](docs/gone.md), "
                                    "[no heading](docs/index.md#part-two), [web](https://example.org)\n\n"
                                    "```\n[in code](nowhere.md)\n```\n")
    (root / "notes.txt").write_text(f"see {FORBIDDEN[1]}\n")

    run = build_site(root, tmp_path / "site")
    assert run.returncode != 0 and "other.md" in run.stderr  # a page missing from the nav
    (root / "mkdocs.yml").write_text((root / "mkdocs.yml").read_text() + "  - Other: other.md\n")
    assert build_site(root, tmp_path / "site").returncode == 0
    (root / "docs" / "other.md").write_text("# Other\n\n[broken](index.md#part-two)\n")
    run = build_site(root, tmp_path / "site")
    assert run.returncode != 0 and "part-two" in run.stderr  # a link to a missing heading

    assert broken_links(root / "README.md") == ["README.md:3 links to docs/gone.md: no such file",
                                                "README.md:3 links to docs/index.md#part-two: no such heading"]
    assert mentions(root) == [f"notes.txt mentions {FORBIDDEN[1]}"]
