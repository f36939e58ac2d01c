"""The policies in examples/ and docs/ must pass `meshlib check`, so they cannot rot.

Every ```yaml block in docs/*.md is a whole policy that `meshlib check` must accept,
unless the HTML comment on the line just before its fence says otherwise:

- ``<!-- invalid -->``: `meshlib check` must reject it (exit 1);
- ``<!-- endpoints file -->``: a file-registry endpoints file; it must parse, and it
  is written as ``endpoints.yaml`` next to the policies of the same page, so that
  they can name it with ``path: endpoints.yaml``.

A block followed by a ```text block that starts with ``$ meshlib check mesh.yaml``
must print exactly the rest of that text block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshlib.cli import main
from meshlib.discovery.file import parse_endpoints_file

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!--\s*(invalid|endpoints file)\s*-->\s*$")
COMMAND = "$ meshlib check mesh.yaml"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    kind: str  # "policy", "invalid" or "endpoints file"
    text: str
    output: str | None  # the expected `meshlib check` output, when the page shows it

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def doc_blocks() -> list[Block]:
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        source = page.read_text(encoding="utf-8")
        fences = list(FENCE.finditer(source))
        for index, fence in enumerate(fences):
            if fence.group(1) != "yaml":
                continue
            before = source[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.search(before)
            output = None
            if index + 1 < len(fences):
                following = fences[index + 1]
                lines = following.group(2).split("\n", 1)
                if following.group(1) == "text" and lines[0].strip() == COMMAND:
                    output = lines[1] if len(lines) > 1 else ""
            line = source.count("\n", 0, fence.start()) + 1
            kind = marker.group(1) if marker else "policy"
            blocks.append(Block(page, line, kind, fence.group(2), output))
    return blocks


BLOCKS = doc_blocks()


def check(capsys: pytest.CaptureFixture[str], file: str) -> tuple[int, str]:
    code = main(["check", file])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_example_policy_passes_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the file registry path in examples/mesh.yaml is relative to the working directory
    monkeypatch.chdir(ROOT)
    code, output = check(capsys, "examples/mesh.yaml")
    assert code == 0, output
    assert "service payments: 3 endpoint(s)" in output  # examples/endpoints.yaml was read
    assert "not enforced" not in output  # the example only uses what is enforced


def test_example_endpoints_file_parses() -> None:
    path = ROOT / "examples" / "endpoints.yaml"
    endpoints = parse_endpoints_file(path.read_text(encoding="utf-8"), str(path))
    assert [ep.priority for ep in endpoints["payments"]] == [0, 0, 1]


def test_docs_have_policy_blocks() -> None:
    kinds = {block.kind for block in BLOCKS}
    assert {"policy", "invalid", "endpoints file"} <= kinds
    assert any(block.output is not None for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.id)
def test_docs_policy_block(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    if block.kind == "endpoints file":
        parse_endpoints_file(block.text, "endpoints.yaml")
        return
    for other in BLOCKS:  # endpoints files shown earlier on the same page
        if other.page == block.page and other.kind == "endpoints file" and other.line < block.line:
            Path("endpoints.yaml").write_text(other.text, encoding="utf-8")
    Path("mesh.yaml").write_text(block.text, encoding="utf-8")
    code, output = check(capsys, "mesh.yaml")
    assert code == (1 if block.kind == "invalid" else 0), output
    if block.output is not None:
        assert output.strip() == block.output.strip()
