"""Write one benchmark's results into BENCHMARKS.md between its own markers."""

from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(key: str, heading: str, body: str) -> None:
    """Replace the text between `<!-- key:begin -->` and `<!-- key:end -->`, or append a new
    `## heading` section holding it."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = PATH.read_text() if PATH.exists() else "# Benchmarks\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text += f"\n## {heading}\n\n{block}\n"
    PATH.write_text(text)
