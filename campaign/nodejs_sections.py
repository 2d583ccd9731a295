"""Write the second corpus of the research campaign as JSONL: the Node.js API documentation that
Debian's nodejs package installs (/usr/share/doc/nodejs/api/*.md), one document per second-level
section ("## ..."), so that a seeded document split gives a validation set drawn from every page
rather than from a few whole pages.

    python3 campaign/nodejs_sections.py /tmp/nodejs_sections.jsonl
    python3 data/build_local_corpus.py /tmp/nodejs_sections.jsonl --name local_nodejs_sp1024
"""

import json
import re
import sys
from pathlib import Path

API_FOLDER = Path("/usr/share/doc/nodejs/api")
SECTION_HEADING = re.compile(r"^## ", re.MULTILINE)


def sections(text: str) -> list[str]:
    """The page split before every second-level heading; the text before the first is kept."""
    starts = [match.start() for match in SECTION_HEADING.finditer(text)]
    bounds = [0] + starts + [len(text)]
    return [text[begin:end].strip() for begin, end in zip(bounds, bounds[1:]) if text[begin:end].strip()]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: nodejs_sections.py OUTPUT.jsonl", file=sys.stderr)
        return 2
    pages = sorted(API_FOLDER.glob("*.md"))
    if not pages:
        print(f"error: no Markdown pages in {API_FOLDER} (install the nodejs package's documentation)", file=sys.stderr)
        return 2
    count = 0
    with open(sys.argv[1], "w", encoding="utf-8") as output:
        for page in pages:
            for section in sections(page.read_text(encoding="utf-8")):
                output.write(json.dumps({"text": section, "source": page.name}) + "\n")
                count += 1
    print(f"{count} sections from {len(pages)} pages -> {sys.argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
