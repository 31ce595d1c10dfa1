"""Scoped hooks: every hook sciscope registers lives inside a ``with`` block and dies with it.

PyTorch hooks are global state on the module; a hook left behind after an exception silently
changes every later forward pass. :class:`HookSet` removes all of its hooks in ``__exit__``,
whatever happened inside the block.

The read/write helpers find the tensor a :class:`~sciscope.core.sites.Site` names inside what a
module returns (a tensor, a tuple such as Hugging Face layers return, or a ``ModelOutput``) or
inside its inputs, and rebuild the same structure around a replacement tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ShapeError
from .sites import Site

# fn(tensor) -> replacement tensor, or None to leave it alone
TensorFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _pick(obj: Any, index: int, site: Site) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        if index >= len(obj) or not isinstance(obj[index], torch.Tensor):
            raise ShapeError(f"site {str(site)!r}: element {index} of the module's {site.side} is not a tensor")
        return obj[index]
    if isinstance(obj, dict):  # ModelOutput is an OrderedDict
        values = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if index < len(values):
            return values[index]
    raise ShapeError(f"site {str(site)!r}: cannot find a tensor in a {type(obj).__name__}")


def _replace(obj: Any, index: int, new: torch.Tensor) -> Any:
    if isinstance(obj, torch.Tensor):
        return new
    if isinstance(obj, tuple):
        return (*obj[:index], new, *obj[index + 1 :])
    if isinstance(obj, list):
        return [*obj[:index], new, *obj[index + 1 :]]
    if isinstance(obj, dict):
        key = [k for k, v in obj.items() if isinstance(v, torch.Tensor)][index]
        obj[key] = new
        return obj
    raise TypeError(type(obj))


def _register_first(module: nn.Module, hook: Callable[..., Any], *, pre: bool) -> torch.utils.hooks.RemovableHandle:
    """Register ``hook`` ahead of every hook that is not sciscope's, behind sciscope's earlier ones.

    A model's own hooks must see our edit: transformers 5 records ``hidden_states`` with forward
    hooks it adds on the first ``output_hidden_states=True`` call, and an edit running after them
    would be missing from what it reports.  Among our hooks, registration order still holds, so
    ``with steer(...), capture(...)`` captures the steered tensor.
    """
    if pre:
        handle = module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
        table = module._forward_pre_hooks
    else:
        handle = module.register_forward_hook(hook, prepend=True)
        table = module._forward_hooks
    earlier = [k for k, fn in table.items() if k != handle.id and getattr(fn, "_sciscope_hook", False)]
    for k in reversed(earlier):  # torch keeps hooks in an OrderedDict, run in its order
        table.move_to_end(k, last=False)
    return handle


class HookSet:
    """A set of forward hooks removed together when the ``with`` block ends (error or not).

    Its hooks run before any hook the model registered itself (and after the set's earlier ones),
    so what the model records of a site is the edited tensor.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def read(self, module: nn.Module, site: Site, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(tensor)`` each time ``module`` runs, with the tensor ``site`` names."""

        def edit(t: torch.Tensor) -> None:
            fn(t)
            return None

        self.edit(module, site, edit)

    def edit(self, module: nn.Module, site: Site, fn: TensorFn) -> None:
        """Replace the tensor ``site`` names by ``fn(tensor)`` each time ``module`` runs."""
        if site.side == "output":

            def out_hook(mod: nn.Module, args: Any, output: Any) -> Any:
                new = fn(_pick(output, site.index, site))
                return None if new is None else _replace(output, site.index, new)

            out_hook._sciscope_hook = True  # type: ignore[attr-defined]
            self._handles.append(_register_first(module, out_hook, pre=False))
        else:

            def in_hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    new = fn(_pick(args, site.index, site))
                    return None if new is None else (_replace(args, site.index, new), kwargs)
                # Called with keywords only (e.g. hidden_states=...): take the first tensor.
                key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
                if key is None:
                    raise ShapeError(f"site {str(site)!r}: the module received no tensor input")
                new = fn(kwargs[key])
                if new is None:
                    return None
                return args, {**kwargs, key: new}

            in_hook._sciscope_hook = True  # type: ignore[attr-defined]
            self._handles.append(_register_first(module, in_hook, pre=True))

    def remove(self) -> None:
        """Remove every hook of this set (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of sciscope hooks registered anywhere in ``model`` (0 outside sciscope blocks).

    Hooks that other libraries register (transformers records outputs with its own) are not counted.
    """
    n = 0
    for mod in model.modules():
        for fn in [*mod._forward_hooks.values(), *mod._forward_pre_hooks.values()]:
            n += bool(getattr(fn, "_sciscope_hook", False))
    return n
