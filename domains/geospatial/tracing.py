"""Counterfactual pairs for causal tracing: a northern place and a southern place in the same prompt.

Clean is a place of the northern third of latitude, corrupted one of the southern third, both in the
run's prompt template (config ``prompt``: the model and the store read that one). A pair is formed
only when the two prompts tokenise alike position by position: the same length, the place's word
pieces (the filled placeholders: the name, and the country where the template has it) at the same
positions, and the same template tokens everywhere else. Held-out (test-split) places are paired
first, since the latitude read-out below was fitted on training places.

The readout is the sentence embedding as the store pools it (mean over the prompt's tokens for an
encoder, the last token for a causal LM) at the adapter's ``readout_site``; the score is the latitude
that the steering scorer's ridge probe (:func:`.steering.readout`, fitted on the run's store) reads from
it, so "larger is more clean-like" means "further north".
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from sciscope.core.config import Key

if TYPE_CHECKING:
    from sciscope.core.context import RunContext
    from sciscope.core.tracing import CounterfactualPairs

    from .adapter import GeospatialAdapter

__all__ = ["CONFIG_KEYS", "field_spans", "place_pairs", "tracing_pairs"]

#: Config keys of the tracing analysis (it runs after the probes stage).
CONFIG_KEYS: dict[str, Key] = {
    "trace_pairs": Key(32, "probes", min=1, help="northern/southern place pairs traced (fewer when fewer align)"),
}


def field_spans(template: str, row: Any) -> tuple[str, list[tuple[int, int]]]:
    """``(prompt, [(start, end) of each filled placeholder])`` of ``template`` for one place (an obs row)."""
    values = {"name": row.name, "country": row.country_name, "country_code": row.country, "continent": row.continent_name}
    text, spans = "", []
    for literal, field, _, _ in string.Formatter().parse(template):
        text += literal
        if field is not None:
            value = str(values[field])
            spans.append((len(text), len(text) + len(value)))
            text += value
    return text, spans


def _encode(tok: Any, template: str, obs: pd.DataFrame, max_length: int) -> list[tuple[list[int], list[bool], list[bool]]]:
    """Per place: (ids, is a place token, is a special token), without padding."""
    rows = list(obs.itertuples(index=False))
    texts, spans = zip(*(field_spans(template, r) for r in rows)) if rows else ((), ())
    enc = tok(list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True,
              return_special_tokens_mask=True)
    out = []
    for ids, offsets, special, sp in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], spans):
        place = [not s and any(a < se and e > sa for sa, se in sp) for (a, e), s in zip(offsets, special)]
        out.append((list(ids), place, [bool(s) for s in special]))
    return out


def place_pairs(ad: "GeospatialAdapter", n: int) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[Any, ...]]]:
    """Up to ``n`` aligned (north, south) places: ``(north rows, south rows, encodings per pair)``.

    Each side is visited in a seeded order, test-split places first; a northern place takes the first
    unused southern place whose prompt has the same place/template layout and the same template tokens.
    """
    obs, c = ad.places, ad.config
    rng = np.random.default_rng([c["seed"], 0x7ACE])

    def order(side: str) -> pd.DataFrame:
        rows = obs[obs[side].to_numpy(dtype=bool)]
        rows = rows.iloc[rng.permutation(len(rows))]
        return rows.iloc[np.argsort(rows["split"].to_numpy() != "test", kind="stable")]

    north, south = order("north"), order("south")
    tok, template = ad._tokenizer(), c["prompt"]
    enc_n, enc_s = (_encode(tok, template, side, c["max_length"]) for side in (north, south))
    free: dict[tuple[bool, ...], list[int]] = {}
    for j, (_, place, _) in enumerate(enc_s):
        free.setdefault(tuple(place), []).append(j)
    picked_n, picked_s, encs = [], [], []
    for i, (ids, place, special) in enumerate(enc_n):
        for j in free.get(tuple(place), []):
            other = enc_s[j][0]
            if all(a == b for a, b, p in zip(ids, other, place) if not p):  # the template tokens agree
                free[tuple(place)].remove(j)
                picked_n.append(i), picked_s.append(j), encs.append((ids, other, place, special))
                break
        if len(encs) == n:
            break
    return north.iloc[picked_n], south.iloc[picked_s], encs


def tracing_pairs(ad: "GeospatialAdapter", ctx: "RunContext") -> "CounterfactualPairs | None":
    """Northern (clean) and southern (corrupted) places in the same prompt, ``trace_pairs`` of them,
    scored by the store's latitude probe (module docstring). None when no pair aligns."""
    from sciscope.core.tracing import CounterfactualPairs

    north, south, encs = place_pairs(ad, int(ad.config["trace_pairs"]))
    if not encs:
        return None
    model = ctx.model()
    B, P = len(encs), max(len(e[0]) for e in encs)
    pad = ad._tokenizer().pad_token_id or 0
    ids = torch.full((2, B, P), pad, dtype=torch.long)
    att, place, special = (torch.zeros((B, P), dtype=torch.bool) for _ in range(3))
    for i, (a, b, pl, sp) in enumerate(encs):
        n = len(a)
        ids[0, i, :n], ids[1, i, :n] = torch.as_tensor(a), torch.as_tensor(b)
        att[i, :n], place[i, :n], special[i, :n] = True, torch.as_tensor(pl), torch.as_tensor(sp)
    device = next(model.parameters()).device
    inputs = [{"input_ids": x.to(device), "attention_mask": att.long().to(device)} for x in ids]
    if "token_type_ids" in ad._tokenizer().model_input_names:
        for x in inputs:
            x["token_type_ids"] = torch.zeros((B, P), dtype=torch.long, device=device)
    layer = int(ad.readout_site.split(".")[1])
    last = layer == ad.n_layers - 1 and not ad.causal  # an encoder's last_hidden_state is its last block's output
    if not last:
        for x in inputs:
            x["output_hidden_states"] = True  # hidden_states[i + 1] is block i's output
    probe = ad.readout(ctx)["lat"]
    coef = torch.as_tensor(np.asarray(probe.coef, dtype=np.float32)).reshape(-1)
    intercept = float(np.asarray(probe.intercept, dtype=np.float64).reshape(-1)[0])
    mask = att.float().to(device)
    if ad.pooling == "last":  # the last real token of each prompt
        mask = torch.zeros_like(mask)
        mask[torch.arange(B), att.sum(1) - 1] = 1.0

    def readout(output: Any) -> torch.Tensor:
        h = output.last_hidden_state if last else output.hidden_states[layer + 1]  # (n * B, P, D)
        w = mask.repeat(len(h) // B, 1)[..., None].to(h.dtype)  # copy-major stacks repeat the pairs
        return (h * w).sum(1) / w.sum(1)

    def score(r: torch.Tensor) -> torch.Tensor:
        return r.float() @ coef.to(r.device) + intercept

    first = special[:, 0].all()
    groups: dict[str, Any] = {"place name": place}
    template = att & ~place & ~special
    if template.any():
        groups["template"] = template
    if first:
        groups[ad._tokenizer().convert_ids_to_tokens(int(ids[0, 0, 0]))] = [0]  # [CLS]
    rest = special.clone()
    rest[:, 0] &= ~first
    if rest.any():
        groups["[SEP] / other specials"] = rest
    return CounterfactualPairs(
        clean=inputs[0], corrupted=inputs[1], readout=readout, score=score, position_groups=groups,
        concept=f"a northern vs a southern place in the prompt {ad.config['prompt']!r} ({B} pairs, same word pieces; "
                f"mean latitude {north['lat'].mean():.0f} vs {south['lat'].mean():.0f})",
        score_name=f"latitude read by the ridge probe at {ad.readout_site} ({ad.pooling} pooling), fitted on the run's store")
