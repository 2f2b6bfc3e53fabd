from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from awqkit.architectures import find_decoder
from awqkit.calibration import capture_block_inputs, search_token_indices, walk_blocks
from awqkit.shipped import shipped_model

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # Six layers so that sliding (0-4) and full attention (5) both occur, with a window shorter
    # than the test sequences so the sliding mask matters.
    "gemma3_text": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=8,
    ),
}


def tiny_model(model_type: str, layers: int = 2, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    params = dict(TINY[model_type], num_hidden_layers=6 if model_type == "gemma3_text" else layers, vocab_size=49152)
    config = AutoConfig.for_model(model_type, **{**params, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def walked_last_block_output(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """The last block's output when the calibration walk feeds the windows block by block."""
    layout = find_decoder(model)
    indices = search_token_indices(windows.numel(), 32, 0)
    inputs = capture_block_inputs(layout, windows, batch_size, torch.float32)
    *_, last = walk_blocks(layout, inputs, search_indices=indices)
    return torch.cat(last.outputs)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return shipped_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return shipped_model("gemma3")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised two-layer Llama in bf16 with SmolLM2's tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    from awqkit.corpora import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "calib.txt"
    path.write_text(load_corpus("python-doc")[:200_000])
    return path


def save_tiny(folder: Path, tokenizer, model_type: str = "llama", dtype: torch.dtype = torch.bfloat16, **overrides) -> Path:
    """A randomly initialised model folder in ``dtype`` with SmolLM2's tokenizer."""
    model = tiny_model(model_type, **{"hidden_act": "silu", **overrides}).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, sharded or not."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(path))
    return tensors
