"""A model streamed from its safetensors shards: a skeleton on the meta device, each block's
tensors read only when the walk reaches it, so memory holds one block whatever the model's size."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from awqkit.io.safetensors import FLOAT_CODES, CheckpointFiles, dtype_name
from awqkit.model.experts import LinearExperts, split_experts
from awqkit.model.layout import DecoderLayout, find_decoder
from awqkit.model.linearize import linearize, transposed_weights
from awqkit.model.load import check_layer_count, check_no_custom_code, model_class

log = logging.getLogger("awqkit")


def checkpoint_renaming(model: nn.Module) -> Callable[[str], str]:
    """Stored key -> the model's name for it, by transformers' renamings for the model type
    (Mixtral's ``block_sparse_moe`` is its ``mlp``). Fusing conversions are not applied: awqkit
    holds experts as linears (awqkit.model.experts), named per expert as checkpoints store them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model, add_legacy=False) if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    return rename


class StreamedModel:
    """A causal LM's skeleton on the meta device, its tensors read from the checkpoint on demand."""

    def __init__(self, folder: Path, dtype: torch.dtype | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        self.folder = folder
        check_no_custom_code(folder)
        self.files = CheckpointFiles(folder)
        self.dtype = dtype  # None: each tensor as stored
        self.config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        check_layer_count(folder, self.config, self.files.names())
        with init_empty_weights(include_buffers=False):  # rotary tables are computed, not stored
            self.model: nn.Module = model_class(self.config).from_config(self.config)
        self.model.eval()
        linearize(self.model)
        self.transposed = transposed_weights(self.model)  # GPT-2's Conv1D weights, stored [in, out]
        # experts whose checkpoints hold the fused tensors (gpt-oss): read fused, split per expert
        self.fused_experts = {
            name: module for name, module in self.model.named_modules()
            if isinstance(module, LinearExperts) and module.fused is not None
        }  # fmt: skip
        self.files.rename(checkpoint_renaming(self.model))
        self.layout: DecoderLayout = find_decoder(self.model)
        self._check_tensors()
        self._warn_of_extra_layers()

    def _check_tensors(self) -> None:
        """Every tensor the model holds is stored, in the shape the config gives it and, where the
        model holds floats, as 16-, 32- or 64-bit floats: checked from the headers before any work."""
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})  # as the config resolves them
        expected = {name: tuple(t.shape) for name, t in self.model.state_dict().items() if name not in tied}
        expected |= {name: expected[name][::-1] for name in self.transposed if name in expected}
        for prefix, experts in self.fused_experts.items():
            expected = {n: shape for n, shape in expected.items() if not n.startswith(prefix + ".")}
            expected |= {f"{prefix}.{n}": shape for n, shape in experts.fused.shapes.items()}
        missing = sorted(set(expected) - set(self.files.files))
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ValueError(
                f"{self.folder}: the checkpoint lacks {shown}; awqkit streams checkpoints whose tensor names are "
                "the model's own (re-save it with transformers' save_pretrained)"
            )
        headers = self.files.headers()
        floats = {name for name, t in self.model.state_dict().items() if t.is_floating_point()}
        floats |= {f"{prefix}.{n}" for prefix, experts in self.fused_experts.items() for n in experts.fused.shapes}
        for name, shape in expected.items():
            header, stored = headers[name], self.files.keys[name]
            if header.shape != list(shape):
                raise ValueError(
                    f"{header.file}: {stored} has shape {header.shape}, but config.json makes it {list(shape)}"
                )
            if name in floats and header.dtype not in FLOAT_CODES:
                kind = "an already quantized checkpoint" if header.dtype.startswith("F8") else "not a float"
                raise ValueError(
                    f"{header.file}: {stored} is stored as {dtype_name(header.dtype)} ({kind}); awqkit quantizes "
                    "float16, bfloat16 and float32 weights"
                )

    def _warn_of_extra_layers(self) -> None:
        blocks = self.layout.blocks_name + "."
        extra = sorted({int(name[len(blocks) :].split(".")[0]) for name in self.files.names()
                        if name.startswith(blocks) and name[len(blocks) :].split(".")[0].isdigit()}
                       - set(range(len(self.layout.blocks))))  # fmt: skip
        if extra:
            shown = f"{blocks}{extra[0]}" + (f" to {blocks}{extra[-1]}" if len(extra) > 1 else "")
            log.warning(
                "%s stores %s beyond config.json's %d layers: left out of the output",
                self.folder, shown, len(self.layout.blocks),
            )  # fmt: skip

    def block_prefix(self, index: int) -> str:
        return f"{self.layout.blocks_name}.{index}."

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors, named relative to the block, as loaded (CPU)."""
        prefix = self.block_prefix(index)
        fused = {name.removeprefix(prefix): experts for name, experts in self.fused_experts.items()
                 if name.startswith(prefix)}  # fmt: skip
        names = [n for n in self.layout.blocks[index].state_dict() if not any(n.startswith(f + ".") for f in fused)]
        names += [f"{f}.{n}" for f, experts in fused.items() for n in experts.fused.shapes]
        tensors = {name: self._as_loaded(t) for name, t in self.files.read([prefix + n for n in names]).items()}
        state = {name: tensors[prefix + name] for name in names}
        for f, experts in fused.items():
            stored = {n: state.pop(f"{f}.{n}") for n in experts.fused.shapes}
            split = split_experts(stored, experts.fused.layout, experts[0].names)
            state |= {f"{f}.{n}": t.contiguous() for n, t in split.items()}
        transposed = {name.removeprefix(prefix) for name in self.transposed if name.startswith(prefix)}
        return {name: t.T.contiguous() if name in transposed else t for name, t in state.items()}

    def stored_name(self, name: str) -> str:
        """What the checkpoint calls the model's tensor ``name`` (Mixtral's ``block_sparse_moe`` for
        the model's ``mlp``); a tensor a packed format adds (``weight_packed``) is named after its
        linear's stored weight. Outputs keep the input's names, which every loader of it reads."""
        if name in self.files.keys:
            return self.files.keys[name]
        module, _, suffix = name.rpartition(".")
        weight = self.files.keys.get(f"{module}.weight")
        return f"{weight.removesuffix('.weight')}.{suffix}" if weight is not None else name

    def stored_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.stored_name(name): tensor for name, tensor in tensors.items()}

    def non_block_names(self) -> list[str]:
        """Checkpoint tensors outside the decoder blocks (embeddings, final norm, lm_head), sorted."""
        blocks = self.layout.blocks_name + "."
        return sorted(name for name in self.files.names() if not name.startswith(blocks))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self._as_loaded(t) for name, t in self.files.read(names).items()}

    def _as_loaded(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def _decoder_own_names(self) -> list[str]:
        blocks = self.layout.blocks_name.removeprefix(self._decoder_prefix()) + "."
        return [n for n in self.layout.decoder.state_dict() if not n.startswith(blocks)]

    def _decoder_prefix(self) -> str:
        return f"{self.layout.decoder_name}." if self.layout.decoder_name else ""

    def materialize_decoder(self) -> None:
        """Load the decoder's own tensors (embeddings, norm), not the blocks', for the capture pass."""
        prefix, names = self._decoder_prefix(), self._decoder_own_names()
        tensors = self.read([prefix + n for n in names])
        self.layout.decoder.load_state_dict({n: tensors[prefix + n] for n in names}, strict=False, assign=True)

    def release_decoder(self) -> None:
        """Back to the meta device: the embeddings are not needed after the capture pass."""
        from accelerate.utils import set_module_tensor_to_device

        for name in self._decoder_own_names():
            set_module_tensor_to_device(self.layout.decoder, name, "meta")
