"""PEFT config keys a version-2 file leaves out when they hold their usual value (spec 12.5).

A PEFT ``adapter_config.json`` is ~40 keys, most at PEFT's default; on a small adapter the
stored config was a third of a low-rate file. A version-2 writer stores the config without the
keys of :data:`TABLE_1` whose value is exactly the table's, and says so in the metadata key
:data:`MARKER`; a reader puts them back, so every consumer sees the config key for key.

The table is data, fixed by the spec (a value here never changes: a new table gets a new
number). It is PEFT ``LoraConfig``'s defaults as ``save_pretrained`` writes them (so
``inference_mode`` is ``True``). A value must match in type as well as value (``0`` is not
``0.0``, ``False`` is not ``0``), because the config is written back as JSON.

Both directions are pure functions of the metadata map; nothing here needs more than msgpack.
"""

from __future__ import annotations

import copy
import math
import struct
from typing import Any

import msgpack

MARKER = "adapter_config_elided"
TABLE_VERSION = 1

# spec 12.5, table 1: (key, value) in this order; the order is the restore order of an unsorted config
TABLE_1: tuple[tuple[str, Any], ...] = (
    ("alora_invocation_tokens", None),
    ("alpha_pattern", {}),
    ("arrow_config", None),
    ("auto_mapping", None),
    ("bias", "none"),
    ("corda_config", None),
    ("ensure_weight_tying", False),
    ("eva_config", None),
    ("exclude_modules", None),
    ("fan_in_fan_out", False),
    ("inference_mode", True),
    ("init_lora_weights", True),
    ("kasa_config", None),
    ("layer_replication", None),
    ("layers_pattern", None),
    ("layers_to_transform", None),
    ("loftq_config", {}),
    ("lora_bias", False),
    ("lora_dropout", 0.0),
    ("lora_ga_config", None),
    ("megatron_config", None),
    ("megatron_core", "megatron.core"),
    ("modules_to_save", None),
    ("monteclora_config", None),
    ("peft_type", "LORA"),
    ("qalora_group_size", 16),
    ("rank_pattern", {}),
    ("revision", None),
    ("target_parameters", None),
    ("task_type", None),
    ("trainable_token_indices", None),
    ("use_bdlora", None),
    ("use_dora", False),
    ("use_qalora", False),
    ("use_rslora", False),
    ("velora_config", None),
)
_TABLE = dict(TABLE_1)
_MARKER_KEYS = ("table", "sorted", "absent")


def _kind(v: Any) -> str:
    """The msgpack/JSON type a value is written as: a str enum is a str, a tuple an array."""
    if v is None or isinstance(v, bool):
        return repr(v) if v is None else "bool"
    for t, k in ((int, "int"), (float, "float"), (str, "str"), (bytes, "bin"), (dict, "map"), ((list, tuple), "array")):
        if isinstance(v, t):
            return k
    return type(v).__name__


def same(a: Any, b: Any) -> bool:
    """Equal in value and in written type, all the way down (``0 != 0.0 != False`` here,
    ``-0.0 != 0.0``; a str enum equals its str)."""
    ka = _kind(a)
    if ka != _kind(b):
        return False
    if ka == "map":  # key order is not part of a map's value (JSON objects, PEFT configs)
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if ka == "array":
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if ka == "float":
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def elide(metadata: Any) -> Any:
    """``metadata`` with its ``adapter_config`` stored as spec 12.5 allows, or ``metadata`` itself
    when that would not be smaller, or when :func:`restore` would not give the config back exactly
    (then nothing is left out)."""
    if not isinstance(metadata, dict) or MARKER in metadata:
        return metadata
    cfg = metadata.get("adapter_config")
    if not isinstance(cfg, dict) or not all(isinstance(k, str) for k in cfg):
        return metadata
    trimmed = {k: v for k, v in cfg.items() if not (k in _TABLE and same(v, _TABLE[k]))}
    if len(trimmed) == len(cfg):
        return metadata
    mark = {"table": TABLE_VERSION, "sorted": list(cfg) == sorted(cfg),
            "absent": [k for k, _ in TABLE_1 if k not in cfg]}
    out: dict[str, Any] = {}
    for k, v in metadata.items():
        out[k] = trimmed if k == "adapter_config" else v
        if k == "adapter_config":
            out[MARKER] = mark
    back = restore(out)
    if not same(back, metadata) or (mark["sorted"] and list(back["adapter_config"]) != list(cfg)):
        return metadata
    if len(msgpack.packb(out, use_bin_type=True)) >= len(msgpack.packb(metadata, use_bin_type=True)):
        return metadata
    return out


def usable_marker(metadata: dict[str, Any]) -> bool:
    """The marker is one this reader restores from (spec 12.5): a map of exactly ``table`` = 1,
    ``sorted`` (bool) and ``absent`` (distinct keys of table 1), beside a map ``adapter_config``
    with str keys."""
    mark, cfg = metadata.get(MARKER), metadata.get("adapter_config")
    if not isinstance(mark, dict) or sorted(mark, key=str) != sorted(_MARKER_KEYS):
        return False
    table, srt, absent = mark["table"], mark["sorted"], mark["absent"]
    if type(table) is not int or table != TABLE_VERSION or type(srt) is not bool or not isinstance(absent, list):
        return False
    if not all(isinstance(k, str) and k in _TABLE for k in absent) or len(set(absent)) != len(absent):
        return False
    return isinstance(cfg, dict) and all(isinstance(k, str) for k in cfg)


def restore(metadata: Any) -> Any:
    """``metadata`` as the writer had it: the config's left-out keys back (table 1's keys that are
    neither present nor listed in ``absent``, with the table's values; all keys sorted when the
    marker says the config was sorted, else after the stored ones in table order) and the marker
    removed. Metadata without a marker, or with one this reader cannot use, is returned as stored:
    metadata is informational (spec 3.3), so an unusable marker is not an error."""
    if not isinstance(metadata, dict) or MARKER not in metadata or not usable_marker(metadata):
        return metadata
    mark, cfg = metadata[MARKER], metadata["adapter_config"]
    full = dict(cfg)
    for k, v in TABLE_1:
        if k not in cfg and k not in mark["absent"]:
            full[k] = copy.deepcopy(v)
    if mark["sorted"]:
        full = {k: full[k] for k in sorted(full)}
    return {k: (full if k == "adapter_config" else v) for k, v in metadata.items() if k != MARKER}
