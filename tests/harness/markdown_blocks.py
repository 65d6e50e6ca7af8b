"""The fenced code blocks of a Markdown document, for the tests that run a document's steps.

A block whose first line is `# untested: <why>` is not run: the convention for the few steps
that cannot run in a test (`make run` itself, files only the reader has).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNTESTED = re.compile(r"# untested: (\S.{9,})")


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    text: str

    @property
    def untested(self) -> str | None:
        first = self.text.partition("\n")[0]
        match = UNTESTED.fullmatch(first.strip())
        return match.group(1) if match else None


def markdown_blocks(text: str, name: str) -> list[Block]:
    """The fenced blocks of the Markdown `text` (of the file `name`), with the line their
    fence opens on."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.fullmatch(r"\s*```\s*([\w+-]*).*", line)
        if language is None and fence:
            language, start, lines = fence.group(1), number, []
        elif language is not None and re.fullmatch(r"\s*```\s*", line):
            blocks.append(Block(start, language, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{name} line {start}: a fence is never closed"
    return blocks
