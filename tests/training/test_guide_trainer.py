import json
from pathlib import Path

import pytest
import torch

from dare_pipeline.models.tokenizer import EOS_ID, EOT_ID
from dare_pipeline.training import BatchKind, GuideConfig, GuideTrainer, Phase, build_guide, export_guide
from dare_pipeline.training.guide import CHECKPOINT, LOG, lr_at, schedule_factor
from dare_pipeline.training.optimizers import build_optimizer

ROOT = Path(__file__).resolve().parents[2]
DIFFUSION_MODEL = ROOT / "dare_pipeline" / "models" / "default" / "llada"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "max_position_embeddings": 1024,
        "token_budget": 400, "warmup_steps": 2, "lr": 3e-3, "log_every": 1, "checkpoint_every": 1000}
CURRICULUM = (Phase(0.5, (BatchKind("zero_shot", 1.0, max_shots=0),)),
              Phase(1.0, (BatchKind("fewshot", 0.5, max_shots=3, max_prompt_chars=200),
                          BatchKind("long_canvas", 0.5, max_shots=1, canvases=(128,)))))


def _trainer(tmp_path, name="run", **overrides):
    cfg = GuideConfig(**{**TINY, "steps": 6, **overrides})
    return GuideTrainer(cfg, tmp_path / name, curriculum=CURRICULUM, progress=False)


def _log(directory):
    return [json.loads(line) for line in (directory / LOG).read_text().splitlines()]


def test_exported_guide_loads_offline_with_the_diffusion_models_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = _trainer(tmp_path, steps=2)
    assert trainer.run() is True
    directory = tmp_path / "run" / "model"
    loaded = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert loaded.config.model_type == "llama" and loaded.config.vocab_size == 101
    ids = torch.tensor([[5, 40, 41, 42, 7, 8]])
    trainer.model.eval()
    assert torch.equal(loaded(ids).logits, trainer.model(ids).logits)
    for name in TOKENIZER_FILES:  # byte for byte: any vocabulary check comparing the two directories passes
        assert (directory / name).read_bytes() == (DIFFUSION_MODEL / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(DIFFUSION_MODEL, local_files_only=True).get_vocab()
    assert loaded.generation_config.eos_token_id == [EOS_ID, EOT_ID]
    assert not list(tmp_path.glob("run/.model*"))  # no temporary directory left behind


def test_export_replaces_an_older_export(tmp_path):
    model = build_guide(GuideConfig(**TINY, steps=1))
    export_guide(model, tmp_path / "g")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    export_guide(model, tmp_path / "g")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", local_files_only=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = _trainer(tmp_path, "straight")
    assert straight.run() is True

    first = _trainer(tmp_path, "resumed")
    assert first.run(max_steps=2) is False  # inside the first phase: its pair stream is half used
    second = _trainer(tmp_path, "resumed")
    second.load()
    assert second.step == 2
    assert second.run() is True

    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    a, b = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["step"] for r in b] == list(range(1, 7))


def test_interrupted_run_checkpoints_and_continues(tmp_path, monkeypatch):
    straight = _trainer(tmp_path, "straight")
    straight.run()

    interrupted = _trainer(tmp_path, "killed")
    original = GuideTrainer.train_step

    def step_then_stop(self):
        if self.step == 2:
            raise KeyboardInterrupt("stopped")
        return original(self)

    monkeypatch.setattr(GuideTrainer, "train_step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    monkeypatch.setattr(GuideTrainer, "train_step", original)
    resumed = _trainer(tmp_path, "killed")
    resumed.load()
    assert resumed.step == 2  # the interruption saved its step
    resumed.run()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_time_budget_ends_the_run_and_drives_the_schedule(tmp_path):
    trainer = _trainer(tmp_path, steps=None, minutes=0.03)  # 1.8 s of training
    assert trainer.run() is True
    assert trainer.elapsed >= 1.8
    log = _log(tmp_path / "run")
    progress = [r["progress"] for r in log]
    assert progress == sorted(progress) and progress[-1] > 0.5
    # a finished run resumed trains no further step
    again = _trainer(tmp_path, steps=None, minutes=0.03)
    again.load()
    assert again.run() is True and again.step == trainer.step


def test_schedule_by_progress():
    cfg = GuideConfig(**{**TINY, "warmup_steps": 10}, steps=100, schedule="wsd", decay_fraction=0.2,
                      min_lr_ratio=0.05)
    assert schedule_factor(0.5, cfg) == 1.0 and schedule_factor(0.8, cfg) == 1.0
    assert schedule_factor(0.9, cfg) == pytest.approx(0.525) and schedule_factor(1.0, cfg) == pytest.approx(0.05)
    assert lr_at(0, 0.0, cfg) == pytest.approx(cfg.lr / 10)
    cosine = GuideConfig(**TINY, steps=100, schedule="cosine")
    assert schedule_factor(0.0, cosine) == 1.0 and schedule_factor(1.0, cosine) == pytest.approx(0.05)


def test_resume_refuses_another_architecture(tmp_path):
    _trainer(tmp_path, steps=1).run()
    other = _trainer(tmp_path, steps=1, d_model=64)
    with pytest.raises(ValueError, match="d_model=32"):
        other.load()


def test_config_errors():
    with pytest.raises(ValueError, match="steps or minutes"):
        GuideConfig(**TINY)
    with pytest.raises(ValueError, match="n_kv_heads"):
        GuideConfig(**{**TINY, "n_kv_heads": 3}, steps=1)
    with pytest.raises(ValueError, match="unknown family"):
        GuideConfig(**TINY, steps=1, family_weights={"mul": 1})


def test_muon_keeps_the_embedding_with_adamw():
    model = build_guide(GuideConfig(**TINY, steps=1))
    optimizer = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.98))
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert "model.embed_tokens.weight" not in names
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.down_proj.weight" in names


def test_checkpoint_is_written_atomically(tmp_path):
    trainer = _trainer(tmp_path, steps=2, checkpoint_every=1)
    trainer.run()
    assert (tmp_path / "run" / CHECKPOINT).exists()
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
