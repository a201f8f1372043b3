"""ETF model classes: one subclass per vanilla class, registered with the Auto classes on first use.

A patched model gets its own ``model_type`` (``etf_<type>``) so that vanilla transformers refuses to
load its checkpoint through the Auto classes instead of silently building random FFNs. The classes are
generated from the vanilla ones (``ETF`` + name) rather than written out, so every head of a registered
architecture is covered, and stored in this module's namespace so they pickle by name.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .architectures import model_stacks
from .config import FORMAT_VERSION, ETFConfig
from .configuration_etf import _CONFIG_CLASSES, etf_config_class, register_auto_models
from .hub import MODEL_TAGS, auto_classes, auto_map, write_hub_files
from .injection import apply_etf_layers, etf_layers, frame_is_stored, recorded_modules, store_frames

logger = logging.getLogger("etf_hf")

_MODEL_CLASSES: dict[type, type] = {}


def _refuse_shared_stack_layers(model: PreTrainedModel, etf: ETFConfig) -> None:
    """A recorded config lists a model of several stacks' blocks per stack (`etf_hf.patch` writes it so);
    one list for all stacks was written by a release that gave block i of every stack the same frame,
    which this release cannot regenerate: refused rather than loaded with other frames."""
    if not isinstance(etf.layers, list) or not etf.layers or not model_stacks(model, etf).named:
        return
    raise ValueError(
        f"config.etf of this {type(model).__name__} lists layers={etf.layers} for all its stacks at once: it was "
        f"written by an etf_hf release that gave block i of the encoder and of the decoder the same frame, which "
        f"this release (one frame per stack) cannot rebuild. Load it with the etf_hf release that wrote it and "
        f"call etf_hf.materialize(model) before saving, or patch the vanilla model again")


class ETFModelBase:
    """What every ETF model class needs to be built and loaded, and all that a checkpoint's remote code
    holds (see `etf_hf.hub`): construction applies the record in ``config.etf`` (`ETFConfig.modules`) to
    the freshly built vanilla model, so ``from_config`` and ``from_pretrained`` rebuild the patched
    structure; loading then restores what transformers cannot: regenerable frames (left as uninitialised
    memory), and fails loudly on stored frames that are missing or of the wrong shape.
    """

    etf_vanilla_class: type[PreTrainedModel]

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if not isinstance(getattr(config, "etf", None), dict):
            raise ValueError(
                f"{type(self).__name__} needs a config with an `etf` field; to add ETF layers to a "
                f"{self.etf_vanilla_class.__name__}, load it with transformers and call etf_hf.patch(model, ETFConfig(...))"
            )
        config.etf = self._etf_record(config.etf)
        apply_etf_layers(self, config.etf)
        self.add_model_tags(list(MODEL_TAGS))  # a Trainer's model card carries them

    def _etf_record(self, etf: dict[str, Any]) -> dict[str, Any]:
        """``config.etf`` as `apply_etf_layers` reads it. Remote code reads only the format it was generated
        with (it ships with its checkpoint, whose config etf_hf validated when it wrote it)."""
        if etf.get("format_version") != FORMAT_VERSION or not isinstance(etf.get("modules"), list):
            raise ValueError(
                f"config.etf has format_version {etf.get('format_version')!r} without the modules record of format "
                f"{FORMAT_VERSION}, the only one this remote code reads: load the checkpoint with etf_hf installed "
                f"(pip install etf_hf, then import etf_hf), which reads every earlier format")
        return etf

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        stored = {f"{name}.{key}" for name, layer in etf_layers(model) for key in layer.state_dict()}
        missing = sorted(stored & set(info.get("missing_keys", ())))
        if missing:
            raise OSError(
                f"the checkpoint lacks ETF weights that cannot be regenerated: {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}; it is incomplete or was not written by etf_hf"
            )
        # transformers raises on a shape mismatch unless told ignore_mismatched_sizes=True; then it re-initialises
        # the weight at random, which a fixed frame must never be
        mismatched = sorted({str(entry[0] if isinstance(entry, (tuple, list)) else entry)
                             for entry in info.get("mismatched_keys") or ()} & stored)
        if mismatched:
            raise OSError(f"ETF weights in the checkpoint have the wrong shape: {mismatched[:4]}"
                          f"{' ...' if len(mismatched) > 4 else ''}; a fixed frame cannot be re-initialised "
                          "(ignore_mismatched_sizes=True): load the checkpoint the model was saved with")
        for _, layer in etf_layers(model):
            if not frame_is_stored(layer):
                layer.reset_frame()
        return (model, info) if want_info else model


class ETFModelMixin(ETFModelBase):
    """`ETFModelBase` with what needs the library: every ``config.etf`` format read and validated, and
    saving with remote code and a model card (a model loaded through remote code saves with transformers'
    own ``save_pretrained``, which copies that file and keeps ``config.auto_map``)."""

    def _etf_record(self, etf: dict[str, Any]) -> dict[str, Any]:
        """Validated (`ETFConfig.from_dict`, which reads older formats into this one), and ``modules`` checked
        against what ``layers`` selects in this model, or computed for a format that did not record it."""
        config = ETFConfig.from_dict(etf)
        _refuse_shared_stack_layers(self, config)
        modules = recorded_modules(self, config)
        if config.modules is not None and config.modules != modules:
            differing = next((a, b) for a, b in zip([*config.modules, None], [*modules, None]) if a != b)
            raise ValueError(f"config.etf records modules that its layers={config.layers!r} do not select in "
                             f"{type(self).__name__} (first difference: recorded {differing[0]}, selected "
                             f"{differing[1]}); the checkpoint was edited or written for another model structure")
        return dataclasses.replace(config, modules=modules).to_dict()  # an older format is held (and saved) as this one

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, etf_storage: str | None = None,
                        base_model: str | None = None, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus remote code and a model card.

        etf_storage: ``"compact"`` or ``"dense"`` for this save only (default: ``config.etf["storage"]``).
        base_model: Hub id written into the model card (default: the ``base_model`` of a card already in
            ``save_directory``, else where the model was loaded from).
        """
        etf = ETFConfig.from_dict(self.config.etf)
        storage = etf.storage if etf_storage is None else ETFConfig(storage=etf_storage).storage
        self.config.etf = dataclasses.replace(etf, storage=storage).to_dict()
        self.config.auto_map = auto_map(self)
        try:
            store_frames(self, storage)
            super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                write_hub_files(self, save_directory, base_model)
        finally:
            store_frames(self, etf.storage)
            self.config.etf = etf.to_dict()
            del self.config.auto_map

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                    etf_storage: str | None = None, base_model: str | None = None, **_: Any):
        """Upload exactly what `save_pretrained` writes (weights, config, remote code, model card)."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size, etf_storage=etf_storage,
                                 base_model=base_model)
            operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
                          for path in sorted(Path(folder).iterdir()) if path.is_file()]
            return api.create_commit(repo_id=repo_id, operations=operations, revision=revision,
                                     create_pr=create_pr, commit_message=commit_message or "Upload ETF model (etf_hf)",
                                     commit_description=commit_description)


def etf_model_class(vanilla: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The ETF subclass of a vanilla model class (``GPT2LMHeadModel`` -> ``ETFGPT2LMHeadModel``)."""
    if issubclass(vanilla, ETFModelMixin):
        return vanilla
    if vanilla not in _MODEL_CLASSES:
        name = f"ETF{vanilla.__name__}"
        cls = type(name, (ETFModelMixin, vanilla), {
            "config_class": etf_config_class(vanilla.config_class),
            "etf_vanilla_class": vanilla,
            "__module__": __name__,
            "__doc__": f"{vanilla.__name__} with fixed simplex-ETF feed-forward projections (etf_hf).",
        })
        setattr(sys.modules[__name__], name, cls)
        _MODEL_CLASSES[vanilla] = cls
    return _MODEL_CLASSES[vanilla]


def register_model_type(model_type: str) -> None:
    """Register ``etf_<model_type>`` and the ETF class of every Auto head that ``model_type`` has.

    ``import etf_hf`` does this for the registry's architectures (configs at once, model classes on first
    use); call it yourself before loading a checkpoint of an architecture patched through the generic
    fallback (e.g. ``"opt"``).
    """
    config_class = etf_config_class(AutoConfig.for_model(model_type).__class__)
    register_auto_models(config_class)


def register_model_classes(config_class: type[PretrainedConfig]) -> None:
    """Register the ETF class of every Auto head of ``config_class``'s vanilla config (see `register_auto_models`)."""
    vanilla_config = config_class.etf_vanilla_class
    for auto_class in auto_classes():
        try:
            vanilla_model = auto_class._model_mapping[vanilla_config]
        except (KeyError, ValueError):
            continue
        if isinstance(vanilla_model, (tuple, list)) or vanilla_model.config_class is not vanilla_config:
            continue  # a model of another architecture reusing this config (qwen2 -> Jev): not ours to register
        auto_class.register(config_class, etf_model_class(vanilla_model), exist_ok=True)


def __getattr__(name: str) -> type:
    """Generated model classes by name (unpickling), made on demand like their registration."""
    if name.startswith("ETF"):
        from .registration import make_announced_types

        make_announced_types()
        for config_class in list(_CONFIG_CLASSES.values()):
            register_auto_models(config_class)
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
