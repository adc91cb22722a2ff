"""Which modules form Kronecker blocks: selection by name, tied weights, uncovered parameters.

:func:`select_modules` turns ``modules=`` / ``exclude=`` name substrings into the blocks of a
model: the supported modules with a trainable weight (one block per weight: modules holding
the same weight and bias are one block whose calls are more positions), the names of the
parameters each block covers, and warnings (or, with ``strict``, errors) naming the trainable
parameters no block covers.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from kronfac.errors import UncoveredParameterWarning, warn
from kronfac.factors.container import ParamNames
from kronfac.factors.options import name_patterns
from kronfac.layers import LayerAdapter, get_adapter, supported_layers

__all__ = ["select_modules"]

Blocks = tuple[dict[str, LayerAdapter], dict[str, ParamNames], dict[str, list[LayerAdapter]]]


def select_modules(
    model: nn.Module,
    modules: Iterable[str] | str | None,
    strict: bool = False,
    exclude: Iterable[str] | str | None = None,
) -> Blocks:
    """The supported modules of ``model`` whose name contains one of ``modules``.

    Args:
        model: The model.
        modules: Name substrings (a single string counts as one); ``None`` selects every module.
        strict: Raise instead of warning about trainable parameters no block covers.
        exclude: Name substrings of modules (and their submodules) to leave out, applied after
            ``modules``; their parameters are not reported as uncovered.

    Returns:
        ``(adapters, param_names, tied)`` keyed by block name (the first module holding the
        block's weight), in ``named_modules()`` order, for the selected supported modules with
        a trainable weight; ``tied`` lists further modules sharing a block's weight (and bias),
        whose calls count as more positions of that block.

    Raises:
        ValueError: If ``modules`` or ``exclude`` matches no module, nothing is left selected,
            no selected module is supported, or (``strict=True``) a trainable parameter of a
            selected module is not covered.
        NotImplementedError: If modules share a bias but not the weight, or a weight but not
            the bias.

    Warns:
        UncoveredParameterWarning: For trainable parameters of selected modules that no block
            covers, naming every one (``strict=False``).
        UserWarning: For a covered weight also used by a module outside its block.
    """
    named = dict(model.named_modules())
    matched = _matched(named, modules, exclude)
    blocks = _blocks(model, named, matched)
    _warn_shared_weights(model, blocks[0], blocks[2])
    _report_uncovered(named, matched, blocks, strict)
    return blocks


def _matched(
    named: dict[str, nn.Module],
    modules: Iterable[str] | str | None,
    exclude: Iterable[str] | str | None,
) -> list[str]:
    """The names of the selected modules (every module, the model included, for ``None``)."""
    given = name_patterns("modules", modules)
    patterns = None if given is None else list(given)
    excluded = list(name_patterns("exclude", exclude) or ())
    listing = f"Module names: {', '.join(n for n in named if n) or '(none)'}."
    if patterns is None:
        matched = list(named)
    else:
        matched = [n for n in named if n and any(p in n for p in patterns)]
        if not matched:
            raise ValueError(f"modules={patterns!r} matches no module of the model. {listing}")
    if not excluded:
        return matched
    unused = [p for p in excluded if not any(p in n for n in named if n)]
    if unused:
        raise ValueError(f"exclude={unused!r} matches no module of the model. {listing}")
    matched = [n for n in matched if not any(p in n for p in excluded)]
    if not matched:
        raise ValueError(f"exclude={excluded!r} leaves out every selected module.")
    return matched


def _blocks(model: nn.Module, named: dict[str, nn.Module], matched: list[str]) -> Blocks:
    """One block per trainable weight of a selected supported module (see select_modules)."""
    param_name = {id(p): n for n, p in model.named_parameters()}  # first (canonical) names
    adapters: dict[str, LayerAdapter] = {}
    names: dict[str, ParamNames] = {}
    tied: dict[str, list[LayerAdapter]] = {}
    owner: dict[int, str] = {}
    for name in matched:
        adapter = get_adapter(named[name])
        if adapter is None or not adapter.weight.requires_grad:
            continue
        bias = adapter.bias if adapter.bias is not None and adapter.bias.requires_grad else None
        first = owner.get(id(adapter.weight))
        if first is not None:
            _tie(adapters[first], adapter, first, name, tied)
            continue
        if bias is not None and id(bias) in owner:
            raise NotImplementedError(
                f"Modules {owner[id(bias)]!r} and {name!r} share the bias "
                f"{param_name[id(bias)]!r} but not the weight; no Kronecker block covers that."
            )
        owner.update({id(p): name for p in (adapter.weight, bias) if p is not None})
        adapters[name] = adapter
        names[name] = ParamNames(
            param_name[id(adapter.weight)], None if bias is None else param_name[id(bias)]
        )
    if not adapters:
        raise ValueError(
            "No supported layer with trainable weights among the selected modules "
            f"({', '.join(n or '(the model)' for n in matched[:10])}"
            f"{', ...' if len(matched) > 10 else ''}). "
            f"Supported layers: {', '.join(supported_layers())}."
        )
    return adapters, names, tied


def _warn_shared_weights(
    model: nn.Module, adapters: dict[str, LayerAdapter], tied: dict[str, list[LayerAdapter]]
) -> None:
    """Warn about a covered weight also held by a module outside its block.

    A module of another kind (GPT-2's ``lm_head`` beside its token embedding), or one left
    unselected: that use of the weight is not in the block.
    """
    param_name = {id(p): n for n, p in model.named_parameters()}
    block_modules = {id(a.module) for n in adapters for a in [adapters[n], *tied.get(n, [])]}
    weights = {id(a.weight): n for n, a in adapters.items()}
    for mod_name, module in model.named_modules():
        if id(module) in block_modules:
            continue
        for p in module.parameters(recurse=False):
            first = weights.get(id(p))
            if first is None:
                continue
            warn(
                f"Modules {first!r} ({type(adapters[first].module).__name__}) and "
                f"{mod_name!r} ({type(module).__name__}) share a weight "
                f"({param_name[id(p)]!r}) but no Kronecker block: it is covered through "
                f"{first!r} only, and the curvature of its use in {mod_name!r} is left "
                "out. Select the module you mean with `modules=`.",
                UserWarning,
            )


def _report_uncovered(
    named: dict[str, nn.Module], matched: list[str], blocks: Blocks, strict: bool
) -> None:
    """Warn (or raise, ``strict``) about trainable parameters of selected modules left out.

    Only parameters a selected module holds directly (not through its children) count.
    """
    adapters, names, _ = blocks
    covered = {id(a.weight) for a in adapters.values()}
    covered |= {id(a.bias) for n, a in adapters.items() if names[n].bias is not None}
    uncovered = [
        f"{name}.{pname}" if name else pname
        for name in matched
        for pname, p in named[name].named_parameters(recurse=False)
        if p.requires_grad and id(p) not in covered
    ]
    if uncovered and strict:
        raise ValueError(
            f"strict=True: {len(uncovered)} trainable parameter(s) are not covered by any "
            f"Kronecker block: {', '.join(uncovered)}. Freeze them, or leave their modules out "
            "with `exclude=`."
        )
    if uncovered:
        warn(
            f"{len(uncovered)} trainable parameter(s) are not covered by any Kronecker block "
            f"and are left out of the curvature: {', '.join(uncovered)}.",
            UncoveredParameterWarning,
        )


def _tie(
    first: LayerAdapter,
    other: LayerAdapter,
    first_name: str,
    name: str,
    tied: dict[str, list[LayerAdapter]],
) -> None:
    """Let module ``name``, which holds the weight of block ``first_name``, join that block.

    Modules of the same kind and orientation sharing the weight (and the bias, if any) are one
    block whose every call counts as more positions (K-FAC-expand, Eschenhagen et al., 2023).
    A weight shared by modules of different kinds has no single Kronecker block: it is covered
    through the first selected module only (:func:`select_modules` warns, naming both).
    """
    same_bias = first.bias is other.bias or (
        (first.bias is None or not first.bias.requires_grad)
        and (other.bias is None or not other.bias.requires_grad)
    )
    same_kind = type(first) is type(other) and (
        first.in_features,
        first.out_features,
        first.groups,
    ) == (other.in_features, other.out_features, other.groups)
    if not same_kind:  # covered through the first module; select_modules warns
        return
    if not same_bias:
        raise NotImplementedError(
            f"Modules {first_name!r} and {name!r} share a weight but not their bias; no single "
            "Kronecker block covers them."
        )
    tied.setdefault(first_name, []).append(other)
