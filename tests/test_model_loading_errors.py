"""Model loading names what is wrong: a damaged weights file, a folder without weights or tokenizer,
a device torch does not have; a damaged converted copy of a GGUF model is converted again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from okv_testlib import make_model
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import omnikv_runtime.models as okv_models
from omnikv_runtime.errors import ModelLoadError
from omnikv_runtime.models import load_model, resolve_device


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A complete HF folder: the tiny Llama's config and weights, and a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("complete")
    make_model("llama").save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _copy(folder: Path, target: Path, keep: tuple[str, ...] | None = None) -> Path:
    target.mkdir()
    for path in folder.iterdir():
        if keep is None or path.name in keep:
            shutil.copy(path, target / path.name)
    return target


def test_a_complete_folder_loads(model_folder):
    model, tokenizer = load_model(str(model_folder))
    assert model.config.num_hidden_layers == 8 and tokenizer.padding_side == "left"


def test_a_truncated_safetensors_file_is_named(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"a \.safetensors file is damaged or incomplete .*download or copy it"):
        load_model(str(folder))


def test_a_folder_with_only_config_json_says_the_weights_are_missing(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path / "config_only", keep=("config.json",))
    with pytest.raises(ModelLoadError, match=r"has config.json but no weights \(model.safetensors"):
        load_model(str(folder))
    shutil.copy(model_folder / "model.safetensors", folder)
    with pytest.raises(ModelLoadError, match="has weights but no tokenizer files"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "model.device 'tpu' is not a device torch knows: use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("gpu0", "is not a device torch knows"),
        ("cuda:99", "CUDA device"),
    ],
)
def test_a_device_torch_does_not_have_is_named(device, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_device(device)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks a device this machine lacks")
def test_a_device_type_without_a_backend_here_is_named():
    with pytest.raises(ModelLoadError, match="torch has no mps device here"):
        resolve_device("mps")


def test_a_damaged_converted_copy_is_converted_again(model_folder, tmp_path, monkeypatch):
    """The converted folder of a GGUF file is checked by loading it; one that fails is redone once."""
    monkeypatch.setenv("OMNIKV_MODEL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in: the conversion below is faked")
    conversions: list[Path] = []

    def convert(path, dtype, attn):
        conversions.append(path)
        model, _ = load_model(str(model_folder))
        return model, _tokenizer()

    monkeypatch.setattr(okv_models, "_load_gguf_raw", convert)
    first, _ = load_model(str(gguf))
    assert len(conversions) == 1
    second, _ = load_model(str(gguf))  # the converted copy serves later loads
    assert len(conversions) == 1
    (converted,) = (tmp_path / "cache").iterdir()
    weights = converted / "model.safetensors"
    damaged = converted / "damaged"
    damaged.write_bytes(weights.read_bytes()[:100])  # a killed writer or a full disk
    damaged.replace(weights)  # a new file: the loaded models still map the old one
    third, _ = load_model(str(gguf))
    assert len(conversions) == 2
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, third.state_dict()[name]), name
    fourth, _ = load_model(str(gguf))  # the new copy is sound: no third conversion
    assert len(conversions) == 2 and fourth.config.num_hidden_layers == 8


def test_initialize_loads_the_bundled_model_by_name():
    import omnikv_runtime as okv

    engine = okv.initialize("smollm2-135m", config="dense")
    assert engine.num_layers == 30 and engine.tokenizer is not None
    ids = engine.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert engine.generate(ids, max_new_tokens=2).shape[1] == ids.shape[1] + 2
