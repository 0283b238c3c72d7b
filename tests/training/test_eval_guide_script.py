import importlib.util
import json
from pathlib import Path

import torch

from dare_pipeline.evaluation.suite import HELDOUT_FILE, read_jsonl, score
from dare_pipeline.training import GuideConfig, build_guide, encode, export_guide

ROOT = Path(__file__).resolve().parents[2]
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "max_position_embeddings": 1024}


def _script():
    spec = importlib.util.spec_from_file_location("eval_guide", ROOT / "scripts" / "eval_guide.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_greedy_batch_decodes_as_each_prompt_alone():
    script = _script()
    model = build_guide(GuideConfig(**TINY, steps=1, seed=1)).eval()
    prompts = [encode(p["prompt"]) for p in read_jsonl(HELDOUT_FILE)[:3]]
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    batched = script.greedy(model, prompts, 12)
    assert batched == [script.greedy(model, [p], 12)[0] for p in prompts]
    # greedy: each token is the argmax after the prompt and the tokens before it
    ids = torch.tensor([prompts[0] + batched[0]])
    with torch.no_grad():
        argmax = model(input_ids=ids).logits[0, len(prompts[0]) - 1:-1].argmax(-1).tolist()
    assert argmax[:len(batched[0])] == batched[0]


def test_scores_as_eval_heldout(tmp_path, monkeypatch):
    script = _script()
    directory = export_guide(build_guide(GuideConfig(**TINY, steps=1)), tmp_path / "guide")
    problems = read_jsonl(HELDOUT_FILE)[:4]
    # a stand-in decoder that answers two problems right, one with the right final only, one wrong
    texts = [problems[0]["answer"], problems[1]["answer"] + "<|eos|>", "x\n#### " + problems[2]["final"], "nonsense"]
    answers = [encode(t.replace("<|eos|>", "")) + ([2] if "<|eos|>" in t else []) for t in texts]
    monkeypatch.setattr(script, "greedy", lambda model, prompts, n: answers[:len(prompts)])
    out = tmp_path / "result.json"
    threads = torch.get_num_threads()
    try:
        assert script.main(["--model", str(directory), "--limit", "4", "--batch-size", "4", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert [r["id"] for r in result["problems"]] == [p["id"] for p in problems]
    assert result["overall"]["exact_match"] == 0.5 and result["overall"]["final_match"] == 0.75
    for row, problem in zip(result["problems"], problems):
        assert {k: row[k] for k in ("exact_match", "final_match")} == score(problem, row["text"])
