"""The Python examples of README.md, docs/prompts.md and docs/guided.md run, and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PRINT_WITH_RESULT = re.compile(r"^print\((.*)\)\s+# (.*)$")


def _python_blocks(doc: str) -> list[str]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if 'load_model("default")' in b]


def _checked(block: str) -> tuple[str, int]:
    """The block with each `print(X)  # Y` turned into a check that str(X) is Y."""
    lines, checks = [], 0
    for line in block.splitlines():
        match = PRINT_WITH_RESULT.match(line)
        if match:
            lines.append(f"_check({match.group(1)}, {match.group(2)!r})")
            checks += 1
        else:
            lines.append(line)
    return "\n".join(lines), checks


def _check(value, expected):
    """str(value) is `expected`, where `...` stands for what varies between runs (times)."""
    pattern = ".*?".join(re.escape(part) for part in expected.split("..."))
    assert re.fullmatch(pattern, str(value), re.DOTALL), (str(value), expected)


@pytest.mark.parametrize("doc", ["README.md", "docs/prompts.md", "docs/guided.md"])
def test_python_examples_print_what_they_say(doc, monkeypatch):
    blocks = _python_blocks(doc)
    assert blocks, f"{doc} has no example with the embedded model"
    monkeypatch.chdir(ROOT)  # the examples use repository paths (recipes/...)
    for block in blocks:
        source, checks = _checked(block)
        assert checks, "an example without a stated result proves nothing"
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, doc, "exec"), {"_check": _check})  # noqa: S102 - the doc's own example
