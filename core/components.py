"""The components of every block: where attention and the MLP write into the residual stream.

Causal tracing restores or knocks out one component of one layer at a time, a transcoder replaces
one MLP, and the subspace check asks which weights read a site. All three need the same map of a
model: for block ``i`` of the layer stack, its residual output, its attention output and MLP output
(each *before* it is added to the residual), the MLP's input and hidden units, and the layer that
reads those hidden units.

:func:`block_components` finds them in the block families sciscope meets (BERT, RoBERTa, MiniLM
and TimeSformer blocks, GPT-2, Llama and its relatives) by their Hugging Face module names; a model
of another shape declares them as ``{"attn": "blocks.{i}.attn.proj", ...}`` templates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from .errors import SiteError
from .loading import find_layer_stack

#: Pre-residual attention outputs, relative to a block, in order of preference per family.
ATTENTION_OUTPUTS = (
    "attention.output.dense",  # BERT / RoBERTa / MiniLM / ViT / TimeSformer (spatial): before dropout + residual
    "attn",  # GPT-2 (a tuple; its first element is after c_proj)
    "self_attn",  # Llama, Mistral, OPT, ...
)
#: Extra attention outputs some blocks have besides the main one (name in the map, path in the block).
EXTRA_ATTENTION_OUTPUTS = {"attn_time": "temporal_dense"}  # TimeSformer's divided space-time attention
#: (MLP output, MLP input, MLP hidden units, the layer reading the hidden units), relative to a block.
MLP_LAYOUTS = (
    ("output.dense", "intermediate:input", "output.dense:input", "output.dense"),  # BERT family, TimeSformer
    ("mlp", "mlp:input", "mlp.c_proj:input", "mlp.c_proj"),  # GPT-2 (Conv1D c_proj)
    ("mlp", "mlp:input", "mlp.down_proj:input", "mlp.down_proj"),  # Llama family
)
COMPONENT_KEYS = ("attn", "mlp", "mlp_in", "mlp_hidden", "mlp_reader")


@dataclass(frozen=True)
class BlockComponents:
    """The named sites of one block.

    Attributes
    ----------
    layer
        Index in the layer stack.
    resid
        The block's output (the residual stream after the block).
    parts
        ``{component: site}`` of what the block adds to the residual stream: ``"attn"`` (and other
        attention outputs such as TimeSformer's ``"attn_time"``) and ``"mlp"``, before the addition.
    mlp_in, mlp_hidden
        The MLP's input (what a transcoder reads) and its hidden units (the neurons).
    mlp_reader
        Module path of the layer that reads ``mlp_hidden`` (the MLP's output projection).
    """

    layer: int
    resid: str
    parts: dict[str, str] = field(default_factory=dict)
    mlp_in: str | None = None
    mlp_hidden: str | None = None
    mlp_reader: str | None = None

    @property
    def mlp_out(self) -> str | None:
        """The MLP's output site (``parts["mlp"]``)."""
        return self.parts.get("mlp")

    def sites(self) -> dict[str, str]:
        """``{"resid": ..., **parts}``: every component causal tracing patches, residual first."""
        return {"resid": self.resid, **self.parts}


def block_components(model: nn.Module, templates: Mapping[str, str] | None = None) -> list[BlockComponents]:
    """The components of every block of ``model``'s layer stack.

    Parameters
    ----------
    model
        The model (its stack is found by :func:`~sciscope.core.loading.find_layer_stack`).
    templates
        Optional ``{key: "path.{i}..."}`` declarations that replace discovery for their key: ``resid``,
        ``attn`` (or any other attention output, e.g. ``attn_time``), ``mlp``, ``mlp_in``,
        ``mlp_hidden``, ``mlp_reader``. Sites may end in ``:input``.

    Raises
    ------
    SiteError
        When a declared template names a module the model does not have, or a block has neither an
        attention nor an MLP output that discovery knows (declare ``templates`` then).
    """
    stack, n = find_layer_stack(model)
    modules = dict(model.named_modules())
    templates = dict(templates or {})

    def exists(site: str) -> bool:
        return site.partition(":")[0] in modules

    out = []
    for i in range(n):
        block = f"{stack}.{i}"
        found: dict[str, str | None] = {"resid": block}
        attn = next((f"{block}.{a}" for a in ATTENTION_OUTPUTS if exists(f"{block}.{a}")), None)
        found["attn"] = attn
        for name, rel in EXTRA_ATTENTION_OUTPUTS.items():
            if exists(f"{block}.{rel}"):
                found[name] = f"{block}.{rel}"
        layout = next((lay for lay in MLP_LAYOUTS if all(exists(f"{block}.{s}") for s in lay)), None)
        for key, rel in zip(("mlp", "mlp_in", "mlp_hidden", "mlp_reader"), layout or (None,) * 4):
            found[key] = f"{block}.{rel}" if rel else None
        for key, template in templates.items():
            site = template.format(i=i)
            if not exists(site):
                raise SiteError(f"components: {key!r} = {template!r} names {site!r}, which {type(model).__name__} does not have")
            found[key] = site
        if found.get("attn") is None and found.get("mlp") is None:
            raise SiteError(f"components: block {block!r} ({type(modules[block]).__name__}) has no attention or MLP output "
                            f"sciscope knows; declare them, e.g. {{'attn': '{stack}.{{i}}.attn.out', 'mlp': '{stack}.{{i}}.mlp'}}")
        extra = [k for k in found if k not in ("resid", *COMPONENT_KEYS)]
        parts = {k: found[k] for k in ("attn", *extra, "mlp") if found.get(k)}
        out.append(BlockComponents(i, found["resid"], parts, found.get("mlp_in"), found.get("mlp_hidden"), found.get("mlp_reader")))  # type: ignore[arg-type]
    return out
