"""Loading models and writing quantized folders, atomically: a folder exists only when complete."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _check_model_ref(name_or_path: str) -> None:
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"model folder not found: {name_or_path}")


def _one_line(name_or_path: str, error: OSError) -> FileNotFoundError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return FileNotFoundError(f"cannot load model {name_or_path!r}: {first_line}")


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    _check_model_ref(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise _one_line(name_or_path, error) from None


def load_model(name_or_path: str, dtype: str = "auto", tokenizer: Any = None) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, in the dtype the checkpoint was saved in unless ``dtype`` says."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tokenizer = tokenizer or load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except OSError as error:
        raise _one_line(name_or_path, error) from None
    model.eval()
    return model, tokenizer


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"output folder exists: {out_dir} (pass --overwrite to replace it)")


def write_atomically(out_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary sibling folder, then rename it to ``out_dir``."""
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        # mkdtemp (and safetensors' writer) make things private; a checkpoint is an ordinary folder.
        tmp.chmod(0o755)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_quantized(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    record: dict,
    scales: dict[str, torch.Tensor],
    overwrite: bool = False,
    *,
    format: str = "fake",
    quantized: dict[str, Any] | None = None,
) -> Path:
    """Weights (float in the model's dtype, or packed), config, tokenizer, awqkit.json and the scales."""
    from awqkit.formats import write_packed

    def write(folder: Path) -> None:
        if format == "fake":
            model.save_pretrained(folder)
        else:
            write_packed(folder, model, quantized or {}, format)
        tokenizer.save_pretrained(folder)
        (folder / "awqkit.json").write_text(json.dumps(record, indent=2) + "\n")
        save_file(scales, str(folder / "awq_scales.safetensors"), metadata={"format": "pt"})

    return write_atomically(out_dir, overwrite, write)
