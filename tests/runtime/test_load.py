"""Loading official-format checkpoints: bad directories, configs and tensors are clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.errors import CheckpointError, LabelError

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- bad input

def corrupt(src, tmp_path, edit_config=None, edit_tensors=None):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        sd = load_file(str(dst / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(dst / "model.safetensors"))
    return dst


def load(path):
    return build_stream_model(open_checkpoint(path), CPU, torch.float32)


def test_missing_directory():
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint("/nonexistent/dir/x")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        open_checkpoint(tmp_path)


def test_non_utf8_config(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        open_checkpoint(tmp_path)


def test_unknown_architecture(tiny_stream, tmp_path):
    def edit(c):
        c["architectures"] = ["LlamaForCausalLM"]
        del c["guard_inner_size"]
    with pytest.raises(CheckpointError, match="unsupported architecture.*LlamaForCausalLM"):
        open_checkpoint(corrupt(tiny_stream, tmp_path, edit))


def test_missing_unexpected_and_mismatched_tensors_listed(tiny_stream, tmp_path):
    def edit(sd):
        del sd["query_category_head.weight"]
        sd["extra.weight"] = torch.zeros(2)
        sd["risk_level_head.weight"] = torch.zeros(4, 32)
    with pytest.raises(CheckpointError) as e:
        load(corrupt(tiny_stream, tmp_path, edit_tensors=edit))
    msg = str(e.value)
    assert "query_head.category.weight" in msg and "extra.weight" in msg
    assert "risk_level_head.weight: checkpoint (4, 32) vs model (3, 32)" in msg


def test_unknown_label_in_config(tiny_stream, tmp_path):
    with pytest.raises(LabelError, match="response_category_map: unknown category 'Weapons'"):
        load(corrupt(tiny_stream, tmp_path, lambda c: c["response_category_map"].update({"0": "Weapons"})))


def test_label_count_mismatch(tiny_stream, tmp_path):
    with pytest.raises(CheckpointError, match="num_category is 7"):
        load(corrupt(tiny_stream, tmp_path, lambda c: c.update(num_category=7)))


def test_pickle_weights_refused(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(d).tensor_files()


def test_auto_map_is_ignored(tiny_stream):
    ckpt = open_checkpoint(tiny_stream)
    assert "auto_map" in ckpt.config  # present like upstream, and never used
    load(tiny_stream)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="(?s)'Qwen/Qwen3Guard-Stream-0.6B' not found: there is no local directory.*hub id it could not be fetched"):
        open_checkpoint("Qwen/Qwen3Guard-Stream-0.6B")


def test_a_file_instead_of_a_directory(tiny_stream):
    with pytest.raises(CheckpointError, match="is a file"):
        open_checkpoint(tiny_stream / "config.json")
