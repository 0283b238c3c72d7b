import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--ffn-hidden", "64",
        "--token-budget", "400", "--warmup-steps", "2", "--log-every", "1", "--no-progress"]


def _script():
    spec = importlib.util.spec_from_file_location("train_guide_model", ROOT / "scripts" / "train_guide_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_stop_resume_and_load(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    script = _script()
    out = tmp_path / "guide"
    threads = torch.get_num_threads()
    try:
        assert script.main(["--out", str(out), "--steps", "4", "--max-steps", "2", "--seed", "3", *TINY]) == 0
        assert "continue with" in capsys.readouterr().err
        saved = json.loads((out / "train_config.json").read_text())
        assert saved["steps"] == 4 and saved["d_model"] == 32 and saved["seed"] == 3
        assert script.main(["--out", str(out), "--resume", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "step 2," in err  # the resumed session starts where the first one stopped
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["done"] is True
    log = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2


def test_refusals(tmp_path, capsys):
    script = _script()
    out = tmp_path / "guide"
    assert script.main(["--out", str(out), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert script.main(["--out", str(out), *TINY]) == 2  # neither --steps nor --minutes
    assert "steps or minutes" in capsys.readouterr().err
    assert script.main(["--out", str(out), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert script.main(["--out", str(out), "--steps", "1", *TINY]) == 2
    assert "pass --resume" in capsys.readouterr().err
