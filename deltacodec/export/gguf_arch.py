"""Which llama.cpp architecture a base model is, and how llama.cpp's converter lays out its weights.

Data, not code paths: :data:`HF_ARCHITECTURES` maps a Hugging Face ``architectures[0]`` class
name to what ``convert_hf_to_gguf.py`` does with that model's matrices, as far as it concerns a
LoRA on them. A LoRA adapter for llama.cpp must follow every change the converter makes to the
base weight (llama.cpp adds ``scale·B@A`` to the *converted* matrix), so an architecture is only
listed when that change is known here:

* ``rope_permute``: the converter reorders the rows of the q and k projections into llama.cpp's
  interleaved RoPE order (``LlamaModel.permute``: per head, row ``2i`` is HF row ``i`` and row
  ``2i+1`` is HF row ``head_dim/2 + i``). The same reorder applies to the rows of lora_b; it
  needs the base model's head counts (``--base-config``).
* ``transposed``: HF weight names (suffixes) that the converter transposes, GPT-2's ``Conv1D``
  weights stored (in, out) in HF. PEFT's factors of those layers (``fan_in_fan_out``) are already
  (r, in) and (out, r) in the orientation llama.cpp ends up with, so they go unchanged; any other
  ``fan_in_fan_out`` module could not be expressed and is refused.

Reading a base model's config.json for the head counts is here too. Nothing here imports
``gguf``: the names are llama.cpp's architecture strings (``general.architecture``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import DecodeError

__all__ = ["GgufArch", "HF_ARCHITECTURES", "BaseConfig", "config_path", "read_base_config", "resolve_arch", "known_names"]


@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp's converter writes one architecture (see the module docstring)."""

    name: str
    rope_permute: bool = False
    transposed: tuple[str, ...] = ()


_GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")

# Hugging Face architecture (config.json "architectures"[0]) -> llama.cpp architecture, as
# convert_hf_to_gguf.py registers them. The bare-model classes (LlamaModel, Qwen2Model) have no
# "model." prefix on their weights; the converter adds it, and so does the name mapping here.
HF_ARCHITECTURES: dict[str, GgufArch] = {
    "LlamaForCausalLM": GgufArch("llama", rope_permute=True),
    "LlamaModel": GgufArch("llama", rope_permute=True),
    "MistralForCausalLM": GgufArch("llama", rope_permute=True),
    "Qwen2ForCausalLM": GgufArch("qwen2"),
    "Qwen2Model": GgufArch("qwen2"),
    "Qwen3ForCausalLM": GgufArch("qwen3"),
    "GemmaForCausalLM": GgufArch("gemma"),
    "Gemma2ForCausalLM": GgufArch("gemma2"),
    "Phi3ForCausalLM": GgufArch("phi3"),
    "GPT2LMHeadModel": GgufArch("gpt2", transposed=_GPT2_CONV1D),
}


def _by_gguf_name() -> dict[str, GgufArch]:
    out: dict[str, GgufArch] = {}
    for a in HF_ARCHITECTURES.values():
        # Every HF class of one llama.cpp architecture is converted the same way here (a test
        # checks it), so the llama.cpp name alone says how.
        out.setdefault(a.name, a)
    return out


def known_names() -> str:
    """The accepted ``--arch`` spellings, for messages."""
    return f"{', '.join(sorted(HF_ARCHITECTURES))} (or llama.cpp's names: {', '.join(sorted(_by_gguf_name()))})"


def _lookup(name: str, source: str) -> GgufArch:
    if name in HF_ARCHITECTURES:
        return HF_ARCHITECTURES[name]
    by_name = _by_gguf_name()
    if name in by_name:
        return by_name[name]
    raise DecodeError(f"{source}: architecture '{name}' is not one llama.cpp export knows; expected one of {known_names()}")


# ----------------------------------------------------------------------------------------------
# The base model's config.json

_MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KB; a larger file is not one
_HEAD_KEYS = ("n_heads", "num_attention_heads", "n_head")  # what the converter's find_hparam tries
_KV_KEYS = ("n_kv_heads", "num_key_value_heads")


@dataclass(frozen=True)
class BaseConfig:
    """What the GGUF export needs from the base model's config.json (any may be missing)."""

    path: str
    architecture: str | None
    n_head: int | None
    n_head_kv: int | None
    tie_word_embeddings: bool


def _count(cfg: Mapping[str, Any], keys: tuple[str, ...], where: str) -> int | None:
    for k in keys:
        if k in cfg:
            v = cfg[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DecodeError(f"{where}: '{k}' is {v!r}; expected a positive integer")
            return v
    return None


def config_path(src: str | os.PathLike[str]) -> str:
    """The file a ``base_config`` path names: itself, or the config.json in a model directory."""
    p = os.fspath(src)
    return os.path.join(p, "config.json") if os.path.isdir(p) else p


def read_base_config(src: str | os.PathLike[str] | Mapping[str, Any]) -> BaseConfig:
    """The base model's config: a config.json path, a model directory holding one, or a dict."""
    if isinstance(src, Mapping):
        where, cfg = "base_config", dict(src)
    else:
        p = config_path(src)
        try:
            with open(p, "rb") as fh:
                raw = fh.read(_MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise DecodeError(f"{p}: cannot read the base model config: {exc.strerror or exc}") from None
        if len(raw) > _MAX_CONFIG_BYTES:
            raise DecodeError(f"{p}: larger than {_MAX_CONFIG_BYTES >> 20} MiB; expected a model's config.json")
        try:
            cfg = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DecodeError(f"{p}: not a JSON config ({exc})") from None
        where = p
    if not isinstance(cfg, dict):
        raise DecodeError(f"{where}: expected a JSON object (a model's config.json), got {type(cfg).__name__}")
    archs = cfg.get("architectures")
    arch = None
    if archs is not None:
        if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
            raise DecodeError(f"{where}: 'architectures' is {archs!r}; expected a list of class names")
        arch = archs[0]
    n_head = _count(cfg, _HEAD_KEYS, where)
    n_kv = _count(cfg, _KV_KEYS, where)
    if n_kv is None:
        n_kv = n_head  # transformers' default for a config without the key
    tie = cfg.get("tie_word_embeddings", False)
    return BaseConfig(where, arch, n_head, n_kv, tie is True)


# ----------------------------------------------------------------------------------------------
# Which architecture


def _recorded_class(metadata: Mapping[str, Any]) -> str | None:
    """The base model class the .sld's metadata records, or None. PEFT writes it in
    adapter_config's ``auto_mapping`` (when saved without a task type); the base model id
    (``base_model_name_or_path``) names a checkpoint, not an architecture, and is not guessed from."""
    cfg = metadata.get("adapter_config") if isinstance(metadata, Mapping) else None
    auto = cfg.get("auto_mapping") if isinstance(cfg, Mapping) else None
    cls = auto.get("base_model_class") if isinstance(auto, Mapping) else None
    return cls if isinstance(cls, str) and cls else None


def resolve_arch(
    file: str, metadata: Mapping[str, Any], arch: str | None, base: BaseConfig | None
) -> tuple[str, GgufArch]:
    """(where it came from, the architecture) for an export of ``file``.

    Order: ``arch`` (``--arch``), the base config's ``architectures``, the file's recorded
    base model class. ``arch`` and a base config that disagree are an error.
    """
    if arch is not None:
        got = _lookup(arch, "--arch")
        if base is not None and base.architecture is not None:
            other = _lookup(base.architecture, f"{base.path}: architectures")
            if other.name != got.name:
                raise DecodeError(
                    f"--arch {arch} is llama.cpp's '{got.name}', but {base.path} describes a "
                    f"'{base.architecture}' ('{other.name}'); give one of them"
                )
        return "--arch", got
    if base is not None and base.architecture is not None:
        return f"{base.path}: architectures", _lookup(base.architecture, f"{base.path}: architectures")
    recorded = _recorded_class(metadata)
    if recorded is not None:
        return f"{file}: adapter_config.auto_mapping", _lookup(recorded, f"{file}: adapter_config.auto_mapping.base_model_class")
    base_id = metadata.get("base_model") if isinstance(metadata, Mapping) else None
    named = f" (its base model '{base_id}' is a model id, not an architecture)" if isinstance(base_id, str) else ""
    raise DecodeError(
        f"{file}: the file does not record its base model's architecture{named}; pass --arch "
        f"(one of {known_names()}) or --base-config BASE/config.json"
    )
