"""`generate --stream`: the answer canvas after every step, filled in until it reads as the answer."""

from pathlib import Path

from dare_pipeline.cli import main
from dare_pipeline.cli.progress import BLANK, LINE_BREAK, MASKED, NO_TOKENIZER

README = Path(__file__).parents[2] / "README.md"


def test_generate_stream_draws_the_canvas_each_step(capsys):
    args = ["generate", "Q: reverse pythonwizard\nA: ", "Q: reverse abc\nA: ", "--recipe", "recipes/baseline.yaml",
            "--set", "generation.gen_length=32", "--set", "generation.steps=32", "--stream"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    frames = [line for line in lines if line.startswith("step ")]
    assert len(frames) == 2 * 32  # two prompts, one line each per step
    first, last = frames[0], frames[-2]
    assert first.startswith("step 1 [0] ") and first.count(MASKED) == 31  # one token committed by step 1
    assert last.startswith("step 32 [0] ") and MASKED not in last
    answer = lines[lines.index("--- [0]") + 1]
    assert last.removeprefix("step 32 [0] ").split(BLANK)[0] == answer  # the answer ends at the first end-of-text


def test_every_canvas_symbol_is_explained_in_the_readme():
    rows = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    for symbol in (MASKED, BLANK, LINE_BREAK, NO_TOKENIZER):
        assert any(row.startswith(f"| `{symbol}` | ") for row in rows), symbol
