"""The checkpoint's model card fills in what an `m2m infer` / `m2m test` command leaves out.

Precedence, per option: given explicitly > the card > the built-in default.
An explicit value that differs from the card is reported (the card is what
the weights were trained with); one the weights cannot satisfy (other input
channels) is refused here, with one line, before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from map2map.errors import UserError
from map2map.infer.specs import InferConfig
from map2map.modelfit import Checkpoint, ModelCard, read_checkpoint


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A config with every card-given option filled in, the checkpoint it came from, and what was overridden."""

    config: InferConfig
    checkpoint: Checkpoint
    overrides: tuple[str, ...]
    notes: tuple[str, ...]


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, dict) else str(value)


def _callback_dir(card: ModelCard, given: str | None) -> str | None:
    """``--callback-at`` if given, else the card's, which must still exist when the model comes from it."""
    if given is not None or card.callback_at is None:
        return given
    if not os.path.isdir(card.callback_at):
        module = card.model.rsplit(".", 1)[0]
        raise UserError(f"the checkpoint's model {card.model} came from --callback-at {card.callback_at}, which "
                        f"no longer exists; give --callback-at DIR with the directory holding {module}.py")
    return card.callback_at


def _store_fields(path: str | None, storage_options: Any = None) -> list[str] | None:
    if not path:
        return None
    from map2map import store

    return store.open_store(path, storage_options=storage_options).field_names


def resolve(cfg: InferConfig) -> Resolved:
    """Read the checkpoint and fill `cfg` from its card; a checkpoint without a card needs the options."""
    ckpt = read_checkpoint(os.path.abspath(cfg.load_state))
    card = ckpt.card
    if card is None:
        if cfg.model is None:
            raise UserError(f"checkpoint {cfg.load_state} has no model card (it was not written by this m2m "
                            "train): give --model and the other options it was trained with")
        filled = dataclasses.replace(cfg, scale_factor=cfg.scale_factor or 1, misc_kwargs={},
                                     model_kwargs={**(cfg.misc_kwargs or {}), **(cfg.model_kwargs or {})},
                                     norm_kwargs={**(cfg.misc_kwargs or {}), **(cfg.norm_kwargs or {})})
        return Resolved(filled, ckpt, (), ())

    overrides: list[str] = []
    notes: list[str] = []

    def pick(option: str, given: Any, from_card: Any) -> Any:
        if given is None:
            return from_card
        if from_card is not None and _norm(given) != _norm(from_card):
            overrides.append(f"{option} {_show(given)} (the checkpoint's card says {_show(from_card)})")
        return given

    model = pick("--model", cfg.model, card.model)
    scale = pick("--scale-factor", cfg.scale_factor, card.scale_factor)
    in_fields = pick("--in", cfg.in_fields, card.in_fields)
    in_norms = pick("--in-norms", cfg.in_norms, card.in_norms)
    tgt_norms = pick("--tgt-norms", cfg.tgt_norms, card.tgt_norms)
    callback_at = _callback_dir(card, cfg.callback_at)
    if cfg.callback_at is not None and card.callback_at is not None and \
            os.path.abspath(cfg.callback_at) != os.path.abspath(card.callback_at):
        overrides.append(f"--callback-at {cfg.callback_at} (the checkpoint's card says {card.callback_at})")
    def arguments(what: str, from_card: dict[str, Any], specific: dict[str, Any] | None) -> dict[str, Any]:
        """--misc-kwargs replaces the card's arguments, the model's or norms' own option adds to them."""
        if cfg.misc_kwargs is None and specific is None:
            return from_card
        merged = {**(from_card if cfg.misc_kwargs is None else cfg.misc_kwargs), **(specific or {})}
        if merged != from_card:
            overrides.append(f"{what} arguments {merged} (the checkpoint's card says {from_card})")
        return merged

    model_kw = arguments("model", dict(card.model_kwargs), cfg.model_kwargs)
    norm_kw = arguments("norm", dict(card.norm_kwargs), cfg.norm_kwargs)

    tgt = cfg.tgt
    if tgt is None and card.tgt_fields and cfg.data:
        have = _store_fields(cfg.data, cfg.storage_options) or []
        if all(name in have for name in card.tgt_fields):
            tgt = card.tgt_fields
        else:
            notes.append(f"{cfg.data} has no target field {_show(card.tgt_fields)}: predicting without a loss")
    out_field = cfg.out_field
    if out_field is None and not tgt and card.tgt_fields and len(card.tgt_fields) == 1:
        out_field = card.tgt_fields[0]
    out_chan = cfg.out_chan if cfg.out_chan is not None else (None if tgt else card.out_chan)
    filled = dataclasses.replace(cfg, model=model, scale_factor=scale, in_fields=in_fields, tgt=tgt,
                                 in_norms=in_norms, tgt_norms=tgt_norms, callback_at=callback_at,
                                 model_kwargs=model_kw, norm_kwargs=norm_kw, misc_kwargs={}, out_field=out_field,
                                 out_chan=out_chan)
    return Resolved(filled, ckpt, tuple(overrides), tuple(notes))


def check_channels(resolved: Resolved, in_chan: int, out_chan: int) -> None:
    """Refuse inputs or targets whose channels the checkpoint's weights cannot take."""
    card = resolved.checkpoint.card
    if card is None:
        return
    if in_chan != card.in_chan:
        raise UserError(f"the input fields give {in_chan} channels, but the checkpoint's model takes {card.in_chan} "
                        f"({_show(card.in_fields or card.in_chans)}); choose input fields with {card.in_chan} "
                        "channels")
    if out_chan != card.out_chan:
        raise UserError(f"the target fields give {out_chan} channels, but the checkpoint's model predicts "
                        f"{card.out_chan}; choose target fields with {card.out_chan} channels or leave out --tgt")


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    return value
