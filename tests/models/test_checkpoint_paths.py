"""Only regular files inside the checkpoint directory are read: a shard index naming a path outside
it, a symlink leading outside, and a FIFO, device or directory where a file belongs are refused by
name, without opening them (a FIFO would block)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dare_pipeline import load_model
from dare_pipeline.models import CheckpointError


@pytest.fixture
def llada(golden_dir, tmp_path):
    dst = tmp_path / "llada"
    shutil.copytree(golden_dir / "llada", dst)
    return dst


def _index(directory, *names):
    """A shard index mapping the checkpoint's first tensor to each of `names` in turn."""
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"tensor{i}": name for i, name in enumerate(names)}}))


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "shards/../../outside.safetensors",
                                  "..\\..\\etc\\passwd", ""])
def test_an_index_naming_a_file_outside_the_directory_is_refused(llada, name):
    _index(llada, "model.safetensors", name)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: names {_quoted(name)}: a "
                                              rf"checkpoint's files are named relative to its directory, without "
                                              rf"'\.\.' or an absolute path"):
        load_model(llada)


def _quoted(name: str) -> str:
    import re

    return re.escape(repr(name))


def test_a_symlink_leading_outside_the_directory_is_refused(llada, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(llada / "model.safetensors", outside)
    (llada / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: leads to {outside}, outside the checkpoint "
                                              rf"directory {llada}; only files inside it are read"):
        load_model(llada)
    (llada / "model.safetensors").unlink()
    (llada / "config.json").rename(tmp_path / "config.json")
    (llada / "config.json").symlink_to(tmp_path / "config.json")
    shutil.move(outside, llada / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"config\.json: leads to .*, outside the checkpoint directory"):
        load_model(llada)


def test_symlinks_inside_the_directory_and_a_hugging_face_cache_snapshot_load(golden_dir, tmp_path):
    # the cache's layout: <repo>/snapshots/<revision>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--llada"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted((golden_dir / "llada").iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    ids = torch.arange(12)[None]
    assert torch.equal(load_model(snapshot)(ids), load_model(golden_dir / "llada")(ids))
    inside = tmp_path / "inside"
    shutil.copytree(golden_dir / "llada", inside)
    (inside / "model.safetensors").rename(inside / "weights.bin")
    (inside / "model.safetensors").symlink_to("weights.bin")
    assert torch.equal(load_model(inside)(ids), load_model(golden_dir / "llada")(ids))


def _load_in_a_subprocess(path) -> subprocess.CompletedProcess:
    """load_model(path) in a child process, so that a loader blocking on a FIFO fails the test by timeout."""
    code = ("import sys; from dare_pipeline import load_model; from dare_pipeline.models import CheckpointError\n"
            "try:\n    load_model(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    try:
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path} blocked")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_where_a_file_belongs_is_refused_without_blocking(llada, name):
    path = llada / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    out = _load_in_a_subprocess(llada)
    assert out.stdout.strip() == (f"{path}: is a FIFO (named pipe), not a regular file; a checkpoint's files must "
                                  f"be regular files"), out.stderr


def test_a_device_or_a_directory_where_a_file_belongs_is_refused(llada):
    (llada / "model.safetensors").unlink()
    (llada / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a directory, not a regular file"):
        load_model(llada)
    shutil.rmtree(llada / "model.safetensors")
    (llada / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: leads to /dev/zero, outside the checkpoint"):
        load_model(llada)
    (llada / "config.json").unlink()
    (llada / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: is a directory, not a regular file"):
        load_model(llada)


def test_an_index_naming_a_directory_is_refused(llada):
    (llada / "shards").mkdir()
    _index(llada, "model.safetensors", "shards")
    with pytest.raises(CheckpointError, match=r"shards: is a directory, not a regular file"):
        load_model(llada)
