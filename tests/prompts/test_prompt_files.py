"""Prompts from a file or stdin: one per line, or JSONL (text, token ids, chat messages, {prompt} / {messages})."""

import io
import json

import pytest

from dare_pipeline.config import ConfigError
from dare_pipeline.prompts.files import read_prompts

CHAT = [{"role": "user", "content": "add 3+4+5+6"}]


def _file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_jsonl_holds_every_prompt_kind(tmp_path):
    lines = ['"Q: add 1+2\\nA: "', "[1, 2, 3]", json.dumps(CHAT), json.dumps({"prompt": "reverse abc", "id": 7}),
             json.dumps({"prompt": [4, 5]}), json.dumps({"messages": CHAT}), ""]
    assert read_prompts(_file(tmp_path, "p.jsonl", "\n".join(lines))) == [
        "Q: add 1+2\nA: ", [1, 2, 3], CHAT, "reverse abc", [4, 5], CHAT]


def test_plain_lines_are_one_prompt_each(tmp_path):
    path = _file(tmp_path, "p.txt", "add 3+4+5+6\n\n  reverse abc  \r\nsort b,a\n")
    assert read_prompts(path) == ["add 3+4+5+6", "  reverse abc  ", "sort b,a"]


@pytest.mark.parametrize("first_line, layout", [('{"prompt": "x"}', "jsonl"), ("[1, 2]", "jsonl"), ('"x"', "jsonl"),
                                               ("add 1+2", "lines"), ("Q: x", "lines")])
def test_auto_picks_the_layout_from_the_first_line(tmp_path, first_line, layout):
    got = read_prompts(_file(tmp_path, "p.txt", first_line + "\n"))
    assert got == ([json.loads(first_line).get("prompt") if first_line.startswith("{") else json.loads(first_line)]
                   if layout == "jsonl" else [first_line])


def test_explicit_lines_layout_reads_json_looking_text_as_text(tmp_path):
    assert read_prompts(_file(tmp_path, "p.jsonl", '"quoted"\n[x]\n'), "lines") == ['"quoted"', "[x]"]


def test_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("add 3+4+5+6\nreverse abc\n"))
    assert read_prompts("-") == ["add 3+4+5+6", "reverse abc"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"prompt": [1]}\n'))
    assert read_prompts("-") == [[1]]


@pytest.mark.parametrize("text, message", [
    ('"ok"\n{"prompt": \n', r"p\.jsonl:2: not JSON .*--prompts-format lines"),
    ('{"question": "x"}\n', r"p\.jsonl:1: '\{\"question\": \"x\"\}': expected a non-empty string, a list of token"),
    ("[1, true]\n", r"p\.jsonl:1: .*expected a non-empty string"),
    ('""\n', r"p\.jsonl:1: .*expected a non-empty string"),
    ("\n\n", r"p\.jsonl: no prompts"),
])
def test_bad_files_name_the_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        read_prompts(_file(tmp_path, "p.jsonl", text))


def test_missing_file_and_bad_layout(tmp_path):
    with pytest.raises(ConfigError, match="prompts file not found"):
        read_prompts(str(tmp_path / "none.txt"))
    with pytest.raises(ConfigError, match=r"prompts format 'csv': allowed: \['auto', 'lines', 'jsonl'\]"):
        read_prompts(_file(tmp_path, "p.txt", "x\n"), "csv")


def test_a_jsonl_name_means_jsonl_whatever_the_first_line(tmp_path):
    assert read_prompts(_file(tmp_path, "p.txt", "add 1+2\n")) == ["add 1+2"]
    with pytest.raises(ConfigError, match=r"p\.jsonl:1: not JSON"):
        read_prompts(_file(tmp_path, "p.jsonl", "add 1+2\n"))
