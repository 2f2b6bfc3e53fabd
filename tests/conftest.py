"""Two tiers: the fast one (tiny random models, a tokenizer trained here, generated text) runs
first and needs nothing shipped; tests that need a shipped model or Debian text are marked `real`
(automatically when they use a shipped model's fixture) and run after: `pytest -m "not real"`,
then `pytest -m real`. In the fast tier the shipped models and the Debian corpora are unreachable,
so a fast test that quietly depends on them fails instead of passing here and nowhere else."""

import hashlib
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from awqkit.model.layout import find_decoder
from awqkit.model.scale_groups import architecture_of, foldable
from awqkit.model.shipped import shipped_model
from awqkit.model.walk import capture_block_inputs, search_token_indices, walk_blocks
from awqkit.quant.fold import fold_scales

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # Six layers so that sliding (0-4) and full attention (5) both occur, with a window shorter
    # than the test sequences so the sliding mask matters.
    # Mixture-of-experts: 4 experts, 2 per token (awqkit.model.experts)
    "mixtral": dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "gemma3_text": dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
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


def fold_random_scales(model: torch.nn.Module, seed: int = 1) -> int:
    """Fold random s (0.01 to 10) into every foldable group; returns how many groups folded."""
    architecture = architecture_of(model)
    g = torch.Generator().manual_seed(seed)
    folded = 0
    for block in find_decoder(model).blocks:
        for group in reversed(architecture.scale_groups):
            if foldable(group, block):
                width = block.get_submodule(group.balance[0]).in_features
                s = 10 ** (torch.rand(width, generator=g, dtype=torch.float64) * 3 - 2)
                fold_scales(block, group, s.to(next(block.parameters()).dtype), architecture.norm_offset)
                folded += 1
    return folded


REAL_FIXTURES = {"smollm2_dir", "gemma3_dir", "smollm2_tokenizer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)
    items.sort(key=lambda item: item.get_closest_marker("real") is not None)  # fast first, also in one run


@pytest.fixture(autouse=True)
def _fast_tier_has_nothing_shipped(request, monkeypatch, tmp_path_factory):
    if request.node.get_closest_marker("real"):
        return
    import awqkit.data.corpora
    import awqkit.model.shipped

    def unavailable(module: str, install: str) -> Path:
        raise AssertionError(f"a fast-tier test reached the shipped package {module}: mark it real")

    monkeypatch.setattr(awqkit.model.shipped, "_package_dir", unavailable)
    monkeypatch.setenv("AWQKIT_CACHE", str(tmp_path_factory.mktemp("empty-cache")))
    absent = tmp_path_factory.mktemp("no-debian") / "absent"
    monkeypatch.setattr(
        awqkit.data.corpora,
        "DEBIAN_CORPORA",
        {k: (pkg, absent) for k, (pkg, _) in awqkit.data.corpora.DEBIAN_CORPORA.items()},
    )


WORDS = (
    "the a of to and in is it that for on with as was by at be this from or an are not have one "
    "model weight scale group token block layer input output value error search grid round row "
    "python list dict string number function class return import print loop file data text"
).split()


def generated_text(n_words: int, seed: int = 0) -> str:
    """English-like text from a small vocabulary: seeded, paragraphs of sentences."""
    rng = random.Random(seed)
    paragraphs = []
    while n_words > 0:
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(5)
        ]
        paragraphs.append(" ".join(sentences))
        n_words -= sum(s.count(" ") + 1 for s in sentences)
    return "\n\n".join(paragraphs)


def trained_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on generated text, shaped like SmolLM2's (no BOS added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator([generated_text(20_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return trained_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return shipped_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return shipped_model("gemma3")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised two-layer Llama in bf16 with the generated tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "calib.txt"
    path.write_text(generated_text(40_000, seed=1))
    return path


def save_tiny(
    folder: Path, tokenizer, model_type: str = "llama", dtype: torch.dtype = torch.bfloat16, **overrides
) -> Path:
    """A randomly initialised model folder in ``dtype`` with ``tokenizer``."""
    model = tiny_model(model_type, **{"hidden_act": "silu", **overrides}).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing catches it on the way out."""


def stop_at_block(monkeypatch, index: int, error: type[BaseException] = Killed) -> None:
    """Make the block walk raise ``error`` when it reaches block ``index`` (a kill, a Ctrl-C)."""
    import awqkit.pipeline

    real = awqkit.pipeline.quantize_block

    def stopped(visit, *args, **kwargs):
        if visit.index == index:
            raise error
        return real(visit, *args, **kwargs)

    monkeypatch.setattr(awqkit.pipeline, "quantize_block", stopped)


def output_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each file of an output folder but the run's measurements (the one that differs)."""
    from awqkit.pipeline import MEASUREMENTS

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != MEASUREMENTS
    }


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, sharded or not."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def loaded_pair(fake_dir: Path, packed_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' models of a fake export and a compressed-tensors one, the packed one already
    decompressed (which happens on its first forward)."""
    fake = AutoModelForCausalLM.from_pretrained(fake_dir)
    packed = AutoModelForCausalLM.from_pretrained(packed_dir)
    with torch.no_grad():
        packed(torch.zeros(1, 4, dtype=torch.long))
    return fake, packed
