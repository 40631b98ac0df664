"""GGUF block quantization of one tensor (llama.cpp's formats).

Quantizer: the ``gguf`` package's own (``gguf.quants.quantize``) where it has one, else ggml's C
quantizer (:mod:`.ggml_lib`). Reconstruction: always ``gguf.quants.dequantize``, so the ggml path
is checked by an independent decoder. Bytes: the blocks, exactly as a GGUF file stores them.

llama.cpp quantizes along a tensor's rows and needs a row length divisible by the block (32 for
Q4_0/Q8_0, 256 for K-quants). A LoRA factor's rows are short (lora_B is out×r), so each factor
is quantized as one flat row along its long dimension — lora_A as stored (r×in, rank component
by component), lora_B transposed (r×out) — zero-padded to a whole block; the padding's bytes
count (``Coded.pad`` says how much).
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from . import Coded
from .ggml_lib import GgmlQuantizer

__all__ = ["GGUF_TYPES", "gguf_has_quantizer", "block_size", "quantize_flat", "code_factor", "gguf_file_size"]

GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q8_0")


def _qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[_qtype(name)][0]


def gguf_has_quantizer(name: str) -> bool:
    """Whether ``gguf.quants`` can quantize this type (it can dequantize all of GGUF_TYPES)."""
    try:
        gq.quantize(np.zeros((1, block_size(name)), dtype=np.float32), _qtype(name))
        return True
    except NotImplementedError:
        return False


def quantize_flat(x: np.ndarray, name: str, ggml: GgmlQuantizer | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize a 1-D float32 ``x`` as one zero-padded row: (block bytes uint8, reconstruction of
    ``x`` float32 1-D, padding values). Raises ``RuntimeError`` when neither quantizer has ``name``."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    qb = block_size(name)
    pad = (-x.size) % qb
    row = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(1, -1)
    if gguf_has_quantizer(name):
        blocks = gq.quantize(row, _qtype(name))
    elif ggml is not None:
        if ggml.type_name(int(_qtype(name))).upper() != name:
            raise RuntimeError(f"ggml type {int(_qtype(name))} is {ggml.type_name(int(_qtype(name)))}, not {name}")
        blocks = ggml.quantize(row, int(_qtype(name)))
    else:
        raise RuntimeError(f"gguf {gq.__name__} cannot quantize {name} and no ggml library was loaded")
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    x_hat = gq.dequantize(blocks, _qtype(name)).reshape(-1)[: x.size].astype(np.float32)
    return blocks, x_hat, pad


def code_factor(x: np.ndarray, name: str, transpose: bool, ggml: GgmlQuantizer | None = None) -> Coded:
    """One LoRA factor (2-D) through GGUF ``name``; ``transpose`` for lora_B (quantize Bᵀ's rows)."""
    x = np.asarray(x, dtype=np.float32)
    src = x.T if transpose else x
    blocks, flat_hat, pad = quantize_flat(np.ascontiguousarray(src).reshape(-1), name, ggml)
    x_hat = flat_hat.reshape(src.shape)
    return Coded(x_hat=np.ascontiguousarray(x_hat.T if transpose else x_hat), nbytes=blocks.nbytes, pad=pad,
                 payload=blocks)


def gguf_file_size(tensors: list[tuple[str, np.ndarray]], name: str, alpha: float, path: str) -> int:
    """Size in bytes of a real GGUF LoRA file (written to ``path``) holding ``tensors``
    ``(tensor name, block bytes)`` of type ``name``, with the keys llama.cpp's LoRA loader reads
    (general.type, adapter.type, adapter.lora.alpha): the container overhead of the peer."""
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch="llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    for tname, blocks in tensors:
        w.add_tensor(tname, np.ascontiguousarray(blocks, dtype=np.uint8), raw_dtype=_qtype(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.path.getsize(path)
