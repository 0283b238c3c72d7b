import json

from dare_pipeline.training.run_dir import truncate_log


def test_a_resumed_log_keeps_the_lines_up_to_the_checkpoint_step(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (10, 20, 30)) + "\n")
    truncate_log(log, 20)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [10, 20]


def test_a_run_without_a_log_has_nothing_to_cut(tmp_path):
    truncate_log(tmp_path / "train_log.jsonl", 5)
    assert not (tmp_path / "train_log.jsonl").exists()
