"""Model plumbing every adapter needs once: the layer stack, the checkpoint's auto class, user code.

* :func:`find_layer_stack` — the path and length of a model's list of blocks (BERT
  ``encoder.layer``, GPT-2 ``transformer.h``, Llama ``model.layers``, a TimeSformer's
  ``encoder.layer``), also under an LM head (``roberta.encoder.layer`` in ``RobertaForMaskedLM``).
* :func:`layer_aliases` — ``{"layer.{i}": "<stack>.{i}"}`` for readable site names.
* :func:`auto_model_class` / :func:`checkpoint_layer_stack` — which ``transformers`` auto class a
  local checkpoint asks for (causal LM, masked LM incl. ``...ForPreTraining``, or the bare
  model), and its stack read on the meta device (no weights loaded).
* :func:`load_object` — ``"package.module:name"`` or ``"path/to/file.py:name"`` (a user's model
  factory, an adapter class).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .errors import AdapterError, ConfigError

#: Names of block lists, preferred over other lists of identical modules.
STACK_NAMES = ("layer", "layers", "h", "block", "blocks")


def find_layer_stack(model: nn.Module) -> tuple[str, int]:
    """Path and length of the model's stack of blocks, found generically.

    The stack is an ``nn.ModuleList`` of same-type children not nested in another such list
    (which rules out per-layer lists: attention heads, MoE experts). Lists named like a block
    stack (:data:`STACK_NAMES`) are preferred, then the longest, then the first.

    Raises
    ------
    AdapterError
        When the model has no such list.
    """
    found: list[tuple[str, int]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(c) for c in mod}) != 1:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue  # nested inside a stack already found
        found.append((name, len(mod)))
    if not found:
        raise AdapterError(f"cannot find the blocks of {type(model).__name__} (no nn.ModuleList of identical "
                           "modules); give sites by module path instead")
    return max(enumerate(found), key=lambda t: (t[1][0].rsplit(".", 1)[-1] in STACK_NAMES, t[1][1], -t[0]))[1]


def layer_aliases(stack: str, name: str = "layer") -> dict[str, str]:
    """``{"<name>.{i}": "<stack>.{i}"}``: readable site names for every block."""
    return {f"{name}.{{i}}": f"{stack}.{{i}}"}


def layer_index(value: Any, n_layers: int, key: str, *, prefix: str = "layer") -> int:
    """A block index from ``3``, ``"3"``, ``"layer.3"`` or ``-1`` (from the end); ConfigError naming ``key``."""
    try:
        i = int(str(value).removeprefix(f"{prefix}."))
    except ValueError:
        raise ConfigError(f"config {key!r} expects a {prefix} index, got {value!r}") from None
    if i < 0:
        i += n_layers
    if not 0 <= i < n_layers:
        raise ConfigError(f"config {key!r} = {value!r} is out of range: the model has {n_layers} {prefix}s")
    return i


def is_causal(config: Any) -> bool:
    """True when a ``transformers`` config's ``architectures`` name a causal LM."""
    archs = list(getattr(config, "architectures", None) or [])
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def auto_model_class(config: Any) -> Any:
    """The ``transformers`` auto class a checkpoint's ``architectures`` ask for.

    Causal LMs (``*ForCausalLM``, ``*LMHeadModel``) -> ``AutoModelForCausalLM`` (the unembedding
    stays for lens tools); masked LMs (``*ForMaskedLM``, ``*ForPreTraining``, as Geneformer
    ships) -> ``AutoModelForMaskedLM``; anything else -> ``AutoModel``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    archs = list(getattr(config, "architectures", None) or [])
    if is_causal(config):
        return AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining") for a in archs):
        return AutoModelForMaskedLM
    return AutoModel


def checkpoint_dir(spec: str | os.PathLike[str], *, key: str = "model") -> Path:
    """A local Hugging Face model directory (``config.json`` inside); ConfigError naming ``key`` otherwise."""
    path = Path(str(spec)).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"config {key!r}: {str(path)!r} is not a local model directory (no config.json); "
                          "sciscope loads checkpoints from disk only")
    return path


def checkpoint_config(path: str | os.PathLike[str], *, key: str = "model") -> Any:
    """The ``transformers`` config of a local model directory; a :class:`ConfigError` naming the file
    when ``config.json`` is not valid JSON, names an unknown ``model_type`` or needs custom code
    (``trust_remote_code`` stays off)."""
    from transformers import AutoConfig

    path = checkpoint_dir(path, key=key)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {key!r}: {path / 'config.json'} is not valid JSON ({e})") from None
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        why = (" it needs the model folder's own code (auto_map), and sciscope keeps trust_remote_code off;"
               if isinstance(raw, dict) and "auto_map" in raw else "")
        raise ConfigError(f"config {key!r}: cannot read {path / 'config.json'}:{why} {first}") from None


def load_checkpoint(path: str | os.PathLike[str], *, key: str = "model") -> nn.Module:
    """A local Hugging Face checkpoint in the class its ``architectures`` ask for, in eval mode
    (``trust_remote_code`` off, no download)."""
    path = checkpoint_dir(path, key=key)
    cfg = checkpoint_config(path, key=key)
    return auto_model_class(cfg).from_pretrained(path, local_files_only=True, trust_remote_code=False).eval()


def checkpoint_layer_stack(path: str | os.PathLike[str], *, key: str = "model") -> tuple[str, int]:
    """:func:`find_layer_stack` of a local checkpoint without loading its weights (meta device)."""
    import torch

    cfg = checkpoint_config(path, key=key)
    with torch.device("meta"):
        return find_layer_stack(auto_model_class(cfg).from_config(cfg))


def load_object(spec: str, *, what: str = "object", key: str = "model") -> Any:
    """The object named by ``"package.module:name"`` or ``"path/to/file.py:name"``.

    A missing file or module, or a missing name, is a :class:`ConfigError` naming ``key`` and the spec.
    """
    target, sep, attr = str(spec).rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"config {key!r} = {spec!r}: expected 'module:{what}' or 'path/to/file.py:{what}'")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"config {key!r}: file {str(path)!r} does not exist")
        name = f"sciscope_user_{abs(hash(str(path)))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"config {key!r}: cannot import {target!r} ({e})") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise ConfigError(f"config {key!r}: {target!r} has no {attr!r}")
    return obj


def load_factory_model(spec: str, *, key: str = "model") -> nn.Module:
    """Call a user's ``module:factory`` / ``file.py:factory`` (no arguments) and check it returns a module."""
    factory = load_object(spec, what="factory", key=key)
    if not callable(factory):
        raise ConfigError(f"config {key!r}: {spec!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config {key!r}: {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def load_tokenizer(path: str | os.PathLike[str], *, key: str = "model") -> Any:
    """A local Hugging Face tokenizer, right-padded, with a pad token (no download, no remote code).

    Decoder tokenizers (GPT-2, Llama) have no pad token: the eos (else unk, else bos) token pads,
    since padded positions are masked out of pooling anyway and adding a token would change the
    vocabulary. Right padding keeps real tokens at their positions and, in a causal model, never
    lets them attend to padding.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ConfigError(f"config {key!r}: cannot load a tokenizer from {path}: {e}") from e
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token or tok.bos_token
        if fallback is None:
            raise ConfigError(f"config {key!r}: the tokenizer in {path} has no pad, eos, unk or bos token to pad with")
        tok.pad_token = fallback
    tok.padding_side = "right"
    return tok
