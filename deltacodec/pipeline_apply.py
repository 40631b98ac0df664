"""``deltacodec.apply`` on diffusers pipelines and their components.

A diffusers-layout file names its modules ``<component>.<module>`` (``unet.``, ``transformer.``,
``text_encoder.``, ...); a kohya-ss file names them by stems (``lora_unet_down_blocks_0_...``,
``lora_te1_...``: the module name with dots as underscores behind a prefix that says the
component). Neither names a module of the model object the caller holds. :func:`route`, called
at the top of :func:`deltacodec.patch.apply`, maps each entry of such a file onto the module it
means and hands ``patch.apply`` a view in which the file's names *are* the module names: a
plain ``torch.nn.Module`` tree whose leaves are the pipeline's own layers. Everything else is
``patch.apply`` as it is: every target checked before any weight changes, all-or-nothing across
components (they are one model to it), bit-exact ``remove()``, one weight one delta (by name
and by storage), the stacking rules, the fused kernel on CUDA weights.

* ``apply(pipe, f)``: every component the file targets (a component the pipeline lacks leaves
  its entries missing: refused in strict mode).
* ``apply(pipe.unet, f)`` (any component): the file's entries for that component only; which
  component the model is follows from the entries whose names and shapes it holds (two
  components both matching, e.g. SDXL's two CLIP encoders by name: :func:`apply_component`
  says which).

Name resolution follows diffusers' and kohya's loaders: a text encoder without the
``text_model`` level (transformers >= 5 flattens ``CLIPTextModel``) takes names with it;
kohya's ``lora_unet_`` is the pipeline's ``unet``, or its ``transformer`` when it has no UNet
(kohya's Flux files); a kohya stem is matched against the component's module names with dots
replaced by underscores, and a stem two module names would give is refused, naming both. A
UNet's modules also answer to their names in the original Stable Diffusion UNet
(``input_blocks_4_1_...``, how sd-scripts names SDXL LoRAs: :mod:`.layouts.sgm_names`).
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ApplyError, preview
from .format import SldFile, open_sld
from .layouts import diffusers as dl
from .layouts import kohya as kl
from .layouts.sgm_names import sgm_name, unet_structure

__all__ = ["route", "apply_component", "is_pipeline", "file_components"]


def is_pipeline(obj: Any) -> bool:
    """A diffusers pipeline (or anything like one): not a torch module, with a ``components``
    map of name to module."""
    import torch

    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "components", None), dict)


def _kohya_stem(name: str) -> str:
    """The kohya stem of an entry name: a module stem as it is, an extra's key before its part."""
    return name.split(".", 1)[0]


def _entry_component(name: str, kind: str) -> str | None:
    if kind == "diffusers":
        return dl.component_of(name)
    return kl.component_of(_kohya_stem(name))


def _names_kind(f: SldFile) -> str | None:
    """"diffusers" when every entry name starts with a pipeline component, "kohya" when every one
    is a kohya stem (or a key of one), else None (a file for one model, applied as it is)."""
    names = [m.name for m in f.modules] + [t.name for t in f.tensors]
    if not names:
        return None
    if all(dl.component_of(n) for n in names):
        return "diffusers"
    if all(kl.STEM.fullmatch(_kohya_stem(n)) and kl.component_of(_kohya_stem(n)) for n in names):
        return "kohya"
    return None


def file_components(f: SldFile) -> list[str]:
    """The pipeline components the file's entries target, in first-seen order (empty for a file
    whose names are not component-prefixed or kohya stems)."""
    kind = _names_kind(f)
    if kind is None:
        return []
    out: list[str] = []
    for n in [m.name for m in f.modules] + [t.name for t in f.tensors]:
        c = _entry_component(n, kind)
        if c is not None and c not in out:
            out.append(c)
    return out


# ----------------------------------------------------------------------------------------------
# Resolving names inside one component


class _Component:
    """One component (a torch module) and the lookups its names need, built on first use."""

    def __init__(self, name: str, module: Any) -> None:
        self.name, self.module = name, module
        self._modules: dict[str, Any] | None = None
        self._underscored: dict[str, list[str]] | None = None

    @property
    def modules(self) -> dict[str, Any]:
        if self._modules is None:
            self._modules = dict(self.module.named_modules(remove_duplicate=False))
        return self._modules

    def _flat_text_model(self) -> bool:
        # transformers >= 5 CLIPTextModel has no `text_model` level; older files name it.
        return self.name.startswith("text_encoder") and "text_model" not in self.modules

    def by_name(self, rest: str) -> tuple[str, Any] | None:
        """(module name, module) for a diffusers name inside this component."""
        for cand in (rest, rest[len("text_model."):] if rest.startswith("text_model.") and self._flat_text_model() else None):
            if cand is not None and cand in self.modules:
                return cand, self.modules[cand]
        return None

    def by_stem(self, rest: str, where: str) -> tuple[str, Any] | None:
        """(module name, module) for a kohya stem's remainder (the module name, dots as _)."""
        if self._underscored is None:
            self._underscored = {}
            for n in self.modules:
                if n:
                    self._underscored.setdefault(n.replace(".", "_"), []).append(n)
            structure = unet_structure(self.module) if self.name == "unet" else None
            if structure is not None:
                # sd-scripts' SDXL stems use the original UNet's names (input_blocks_4_1_...)
                for n in list(self.modules):
                    sgm = sgm_name(n, *structure) if n else None
                    if sgm is not None:
                        self._underscored.setdefault(sgm.replace(".", "_"), []).append(n)
        cands = [rest]
        if rest.startswith("text_model_") and self._flat_text_model():
            cands.append(rest[len("text_model_"):])
        for cand in cands:
            hits = self._underscored.get(cand)
            if hits:
                if len(hits) > 1:
                    raise ApplyError(
                        f"{where}: kohya stem '{rest}' of component '{self.name}' stands for several modules "
                        f"({preview(hits, limit=4)}): ambiguous, no weight was changed"
                    )
                return hits[0], self.modules[hits[0]]
        return None


def _kohya_rest(stem: str) -> str:
    m = kl._PREFIX.match(stem)
    assert m is not None
    return stem[len(m.group(1)) + 1:]


def _resolve(name: str, kind: str, comps: dict[str, _Component], where: str) -> tuple[_Component, str, Any] | None:
    """(component, module name inside it, module) that the file's module ``name`` (or the parent
    module of an extra of that name) means, or None."""
    comp_name = _entry_component(name, kind)
    if kind == "diffusers":
        comp = comps.get(comp_name or "")
        if comp is None:
            return None
        hit = comp.by_name(name[len(comp.name) + 1:])
    else:
        comp = comps.get(comp_name or "")
        if comp is None and comp_name == "unet":
            comp = comps.get("transformer")  # kohya's lora_unet_ on a DiT pipeline (Flux)
        if comp is None:
            return None
        hit = comp.by_stem(_kohya_rest(_kohya_stem(name)), where)
    return (comp, hit[0], hit[1]) if hit is not None else None


# ----------------------------------------------------------------------------------------------
# The view patch.apply works on


def _view(f: SldFile, kind: str, comps: dict[str, _Component]) -> Any:
    """A torch module tree in which each resolvable entry of ``f`` is found under its own name:
    module entries at their name (their weight at ``<name>.weight``), stored tensors' parent
    modules at the parent's name. The leaves are the pipeline's modules themselves."""
    import torch

    root = torch.nn.Module()
    root._deltacodec_view = True  # route() leaves a view as it is
    placed: dict[str, Any] = {}
    wanted: list[tuple[str, Any]] = []
    for m in f.modules:
        hit = _resolve(m.name, kind, comps, f.path)
        if hit is not None:
            wanted.append((m.name, hit[2]))
    for t in f.tensors:
        parent, dot, _ = t.name.rpartition(".")
        if not dot or parent in placed:
            continue
        hit = _resolve(parent, kind, comps, f.path) if kind == "diffusers" else None
        if hit is not None:
            wanted.append((parent, hit[2]))
    # Shorter names first: a module placed as a leaf is never turned into a container later.
    for name, module in sorted(wanted, key=lambda nm: nm[0].count(".")):
        if name in placed:
            continue
        node = root
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: i + 1])
            if prefix in placed:  # a real module already there: the rest must be its own child
                try:
                    inner = placed[prefix].get_submodule(".".join(parts[i + 1:]))
                except AttributeError:
                    inner = None
                if inner is not module:
                    raise ApplyError(f"{f.path}: '{name}' lies under '{prefix}' in the file but not in the model")
                node = None
                break
            child = node._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                node.add_module(part, child)
            node = child
        if node is not None:
            node.add_module(parts[-1], module)
        placed[name] = module
    return root


def _subset(f: SldFile, components: set[str], kind: str) -> SldFile:
    """A view of ``f`` holding only the entries of ``components`` (sections read from the same
    open file)."""
    sub = copy.copy(f)
    sub.modules = [m for m in f.modules if _entry_component(m.name, kind) in components]
    sub.tensors = [t for t in f.tensors if _entry_component(t.name, kind) in components]
    if hasattr(sub, "_by_module"):
        sub._by_module = {m.name: m for m in sub.modules}
    if hasattr(sub, "_by_tensor"):
        sub._by_tensor = {t.name: t for t in sub.tensors}
        for m in sub.modules:
            sub._by_tensor.setdefault(m.A.name, m.A)
            sub._by_tensor.setdefault(m.B.name, m.B)
    return sub


def _lossless_kohya(f: SldFile) -> list[str]:
    """Stored tensors that are kohya LoRA parts (conv modules a version-1 file keeps as they are,
    DoRA scales): apply cannot add them."""
    return [t.name for t in f.tensors if t.name.partition(".")[2] in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")]


def _check_kohya_extras(f: SldFile, strict: bool) -> None:
    lossless = _lossless_kohya(f)
    if strict and lossless:
        raise ApplyError(
            f"{f.path}: cannot apply (strict): {len(lossless)} kohya-ss tensors are stored as they are, not as "
            f"modules apply can add (conv LoRA in a version-1 file, DoRA scales): {preview(sorted(lossless), limit=4)}; "
            "no weight was changed (strict=False applies the rest)"
        )


def _shape_fits(m: Any, module: Any) -> bool:
    """Whether ``module``'s weight (through a PEFT ``base_layer``) has the shape entry ``m`` needs."""
    base = getattr(module, "base_layer", None)
    w = getattr(base if base is not None else module, "weight", None)
    shape = tuple(getattr(w, "shape", ()))
    if len(shape) == 2:
        return shape in ((m.out_features, m.in_features), (m.in_features, m.out_features))
    rest = 1
    for d in shape[1:]:
        rest *= d
    return len(shape) > 2 and shape[0] == m.out_features and rest == m.in_features


def _score(f: SldFile, kind: str, comp: _Component) -> tuple[int, int]:
    """(entries of the component whose module this model holds, ... with the weight's shape)."""
    by_name = by_shape = 0
    for m in f.modules:
        if _entry_component(m.name, kind) != comp.name:
            continue
        hit = _resolve(m.name, kind, {comp.name: comp}, f.path)
        if hit is None:
            continue
        by_name += 1
        by_shape += _shape_fits(m, hit[2])
    return by_name, by_shape


def _component_view(model: Any, f: SldFile, component: str, kind: str, strict: bool) -> tuple[Any, SldFile]:
    """(view, file subset) that applies ``f``'s entries for ``component`` to ``model``."""
    comps = file_components(f)
    kohya_dit = kind == "kohya" and component == "transformer" and "unet" in comps
    if component not in comps and not kohya_dit:
        raise ApplyError(f"{f.path}: no entries for component '{component}' (the file targets {', '.join(comps)})")
    wanted = {component, "unet"} if kohya_dit else {component}
    sub = _subset(f, wanted, kind)
    if kind == "kohya":
        _check_kohya_extras(sub, strict)
    lookup = {component: _Component(component, model)}
    if kohya_dit:
        lookup["unet"] = lookup[component]
    return _view(sub, kind, lookup), sub


def apply_component(model: Any, source: Any, component: str, **kwargs: Any) -> Any:
    """``deltacodec.apply(model, source, **kwargs)`` with the file's entries for ``component``
    (e.g. ``"text_encoder_2"``) only, for a model that matches several components' entries."""
    from .patch import apply

    f = open_sld(source, kwargs.get("max_decoded_bytes"))
    kind = _names_kind(f)
    if kind is None:
        raise ApplyError(f"{f.path}: its module names carry no pipeline component: apply it to the model directly")
    view, sub = _component_view(model, f, component, kind, kwargs.get("strict", True))
    return apply(view, sub, **kwargs)


def route(model: Any, source: Any, *, max_decoded_bytes: int | None = None, strict: bool = True) -> tuple[Any, Any]:
    """What :func:`deltacodec.patch.apply` should patch: ``(model, source)`` unchanged for a file
    meant for ``model`` as it is, else a view of a pipeline or component and the file (or the
    part of it for that component). See the module docs."""
    if getattr(model, "_deltacodec_view", False):
        return model, source  # a view built here already
    pipeline = is_pipeline(model)
    f = open_sld(source, max_decoded_bytes)
    kind = _names_kind(f)
    if not pipeline:
        if kind is None:
            return model, f
        comps = file_components(f)
        if kind == "diffusers" and any(_has_child(model, c) for c in comps):
            return model, f  # the model holds the components itself: names resolve as they are
        return _route_component(model, f, kind, comps, strict)
    if kind is None:
        raise ApplyError(
            f"{f.path}: its module names carry no pipeline component (unet., transformer., text_encoder., or "
            "kohya-ss lora_unet_/lora_te_ stems): apply it to the component it was made for, e.g. "
            "deltacodec.apply(pipe.unet, ...); no weight was changed"
        )
    comps = {n: _Component(n, m) for n, m in model.components.items() if _is_module(m)}
    if kind == "kohya":
        _check_kohya_extras(f, strict)
    return _view(f, kind, comps), f


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _has_child(model: Any, name: str) -> bool:
    return name in dict(model.named_children())


def _route_component(model: Any, f: SldFile, kind: str, comps: list[str], strict: bool) -> tuple[Any, SldFile]:
    """One component given: pick the component of the file this model is (by names, then by
    shapes), and apply that part of the file."""
    # (entries with the weight's shape, entries by name): shapes tell SDXL's two CLIPs apart
    scores = {c: _score(f, kind, _Component(c, model))[::-1] for c in comps}
    best = max(scores.values())
    if best[1] == 0:
        raise ApplyError(
            f"{f.path}: none of its entries names a module of this {type(model).__name__} (the file targets "
            f"{', '.join(comps)}); apply it to the pipeline, or to the component it was made for; no weight was changed"
        )
    top = [c for c, s in scores.items() if s == best]
    if len(top) > 1:
        raise ApplyError(
            f"{f.path}: this {type(model).__name__} matches the entries of several components ({', '.join(top)}): "
            "apply the file to the pipeline, or say which with "
            "deltacodec.pipeline_apply.apply_component(model, file, component); no weight was changed"
        )
    return _component_view(model, f, top[0], kind, strict)
