"""`Trainer.push_to_hub` with the ETF model card and remote code: a one-call opt-in per trainer.

    trainer = Trainer(model=etf_model, args=TrainingArguments(..., push_to_hub=True))   # or trl's SFTTrainer, ...
    etf_hf.keep_etf_card(trainer)
    trainer.train()
    trainer.push_to_hub()   # README.md: the Trainer's training summary *and* the ETF section, tags, base_model

Why an opt-in and not automatic: ``Trainer.push_to_hub`` saves the model (whose ``save_pretrained`` writes
the ETF card into ``output_dir``), then ``create_model_card`` rewrites README.md from the Trainer's own
training summary (trl's trainers override it with their template), then uploads the folder. Nothing runs
between that rewrite and the upload: callbacks hear ``on_push_begin`` *before* the save and are handed the
model, never the trainer; the one model hook (``create_or_update_model_card``) is called for PEFT cards
only. A plugin therefore cannot reach that card without patching transformers' classes for every user in
the process, which etf_hf does not do. `keep_etf_card` wraps ``create_model_card`` on the one trainer
instance it is given (whatever class defines it), so the ETF section is merged into the Trainer's card.

It also adds a callback for the pushes made *during* training (``push_to_hub=True``, ``hub_strategy``):
those copy only the weights and config from the checkpoint into ``output_dir`` before uploading it, so
without it the Hub copy had a ``config.json`` whose ``auto_map`` names a remote-code file that was not
uploaded (``trust_remote_code=True`` failed) and no ETF card.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from .hub import write_hub_files, write_model_card
from .modeling_etf import ETFModelMixin

if TYPE_CHECKING:
    from transformers import Trainer

#: Marks a ``create_model_card`` that `keep_etf_card` wrapped (a second call wraps nothing again).
_WRAPPED = "_etf_hf_keeps_card"


def _etf_model(trainer: Trainer) -> ETFModelMixin | None:
    """The trainer's model if it is an ETF model (one that `etf_hf.materialize` turned back is not: its card
    is the Trainer's alone)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model if isinstance(model, ETFModelMixin) else None


def _quick_start_with_remote_code(text: str, repo_id: str) -> str:
    """Add ``trust_remote_code=True`` to the card's ``pipeline(..., model="<repo_id>")`` calls (trl's quick
    start): without etf_hf installed, this checkpoint loads only through its remote code."""
    model_argument = re.compile(rf"""model=(["']){re.escape(repo_id)}\1""")

    def with_remote_code(call: re.Match) -> str:
        source = call.group(0)
        if "trust_remote_code" in source or not model_argument.search(source):
            return source
        return model_argument.sub(lambda argument: f"{argument.group(0)}, trust_remote_code=True", source, count=1)

    return re.sub(r"\bpipeline\([^()]*\)", with_remote_code, text)


class _ETFHubFiles(TrainerCallback):
    """Before a push, put the remote code and the ETF card into ``output_dir``: a checkpoint push uploads that
    folder after copying in only the weights and config."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_push_begin(self, args, state, control, **kwargs: Any) -> None:
        model = _etf_model(self.trainer)
        if state.is_world_process_zero and model is not None:
            os.makedirs(args.output_dir, exist_ok=True)
            write_hub_files(model, args.output_dir, repo_id=getattr(self.trainer, "hub_model_id", None))


def keep_etf_card(trainer: Trainer) -> Trainer:
    """Make this trainer's Hub pushes carry etf_hf's card and remote code; returns the trainer.

    After ``create_model_card`` writes the Trainer's card (the training summary, or trl's template), the ETF
    tags, ``base_model`` (the Trainer's ``finetuned_from``, else where the model was loaded from) and the
    ETF section are added to it, and a quick start's ``pipeline(model=<hub repo>)`` gets
    ``trust_remote_code=True``. Only this instance changes; calling it again changes nothing.
    Raises TypeError when the trainer's model is not an ETF model.
    """
    if _etf_model(trainer) is None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        why = (" (a PEFT model: the Trainer pushes the adapter with PEFT's card; publish the patched base model "
               "with model.push_to_hub)" if hasattr(model, "get_base_model") else "")
        raise TypeError(f"etf_hf.keep_etf_card needs a Trainer whose model is an ETF model (etf_hf.patch, or "
                        f"loaded from an ETF checkpoint); this one trains a {type(model).__name__}{why}")
    create_model_card = trainer.create_model_card
    if getattr(create_model_card, _WRAPPED, False):
        return trainer

    def create_etf_model_card(*args: Any, **kwargs: Any) -> None:
        create_model_card(*args, **kwargs)
        model = _etf_model(trainer)
        if not trainer.is_world_process_zero() or model is None:
            return
        repo_id = getattr(trainer, "hub_model_id", None)  # set once the Trainer has created the Hub repo
        write_model_card(model, trainer.args.output_dir, repo_id=repo_id)
        if repo_id:
            card = Path(trainer.args.output_dir) / "README.md"
            card.write_text(_quick_start_with_remote_code(card.read_text(encoding="utf-8"), repo_id), encoding="utf-8")

    create_etf_model_card.__doc__ = create_model_card.__doc__
    setattr(create_etf_model_card, _WRAPPED, True)
    trainer.create_model_card = create_etf_model_card
    trainer.add_callback(_ETFHubFiles(trainer))
    return trainer
