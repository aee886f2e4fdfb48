"""Resolve and load models by kind: encoder (masked LM) or decoder (causal LM), with heads."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cmmerge import dist
from cmmerge.errors import CmmergeError
from cmmerge.presets import SAMPLES_DIR, load_group_config

log = logging.getLogger("cmmerge")

ModelKind = Literal["encoder", "decoder"]


def _tokenizer_corpus() -> list[str]:
    """Texts the tiny models' tokenizer is trained on: the shipped unlabelled corpus samples."""
    from cmmerge.data import load_corpus_texts

    texts: list[str] = []
    for name in ("en-hi", "en-es"):
        texts += load_corpus_texts(load_group_config("corpus", name), SAMPLES_DIR)
    return texts


@dataclass(frozen=True)
class ModelSource:
    """Where a stage's base model comes from: the ``model`` preset, typed.

    Attributes:
        name: The preset's name (``xlmr``, ``tiny-llama``, ``gemma3-270m``...).
        name_or_path: A local folder or a hub id; None for a tiny model or a preset that must
            be given one (``build`` then says how to make it).
        tiny: The architecture of a tiny random-initialised model cmmerge builds and caches.
        build: How to build a local folder offline, named in the error when none is given.
        cache: cmmerge's cache folder (built tiny models go there).
        allow_pickle: Whether a folder with pickle weights only may be loaded.
    """

    name: str
    name_or_path: str | None
    tiny: Mapping[str, Any] | None
    build: str | None
    cache: Path
    allow_pickle: bool = False

    @classmethod
    def from_preset(cls, model: Mapping, cache: Path, allow_pickle: bool = False) -> ModelSource:
        """From a ``model`` preset (a plain mapping or a config node)."""
        tiny = model.get("tiny")
        return cls(
            name=str(model.get("name")),
            name_or_path=str(model["name_or_path"]) if model.get("name_or_path") else None,
            tiny=None if not tiny else {str(k): tiny[k] for k in tiny},
            build=str(model["build"]) if model.get("build") else None,
            cache=Path(cache),
            allow_pickle=allow_pickle,
        )

    @property
    def is_tiny(self) -> bool:
        """Whether this is one of the tiny random-initialised models cmmerge builds."""
        return bool(self.tiny) and not self.name_or_path

    def resolve(self) -> Path:
        """A local folder: a tiny model (built and cached), a local folder, or a hub id
        downloaded to the Hugging Face cache."""
        if self.name_or_path:
            return local_model_dir(self.name_or_path, self.allow_pickle)
        if not self.tiny:
            build = f" (build one offline: {self.build})" if self.build else ""
            raise CmmergeError(
                f"model={self.name}: set model.name_or_path to a folder or hub id{build}"
            )
        from cmmerge.models.tiny import build_tiny_model, tiny_cache_key

        arch = dict(self.tiny)
        family, seed = arch.pop("family"), int(arch.pop("seed", 0))
        texts = _tokenizer_corpus()
        key = tiny_cache_key(family, arch, texts, seed)
        out = self.cache / "models" / f"{self.name}-{key}"
        if not (out / "config.json").exists() and dist.is_main():
            log.info("building %s in %s", self.name, out)
            build_tiny_model(family, arch, texts, out, seed=seed)
        dist.barrier()  # under a multi-process launch, rank 0 builds and the others wait
        return out


def local_model_dir(name_or_path: str, allow_pickle: bool = True, deep: bool = True) -> Path:
    """A local model folder for a path or hub id; one clear error when neither works, or (with
    ``allow_pickle=False``) when its weights are only pickle files (``pytorch_model.bin``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CmmergeError(f"model folder {path} has no config.json (not a Hugging Face model)")
        if not allow_pickle:
            refuse_pickle_only(path)
        from cmmerge.models.check import check_model_folder

        check_model_folder(path, deep=deep)  # config, model type and weights agree, or one line
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise CmmergeError(f"model path {name_or_path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"],
            )
        )
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line
        raise CmmergeError(
            f"model {name_or_path!r} is neither a local folder nor reachable on the hub "
            f"({type(err).__name__}); pass model.name_or_path=DIR of a downloaded model"
        ) from err


def refuse_pickle_only(model_dir: Path) -> None:
    """Refuse a model folder whose only weights are pickle files: unpickling can run code."""
    safe = ("model.safetensors", "model.safetensors.index.json")
    pickles = ("pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((model_dir / f).is_file() for f in safe) and any(
        (model_dir / f).is_file() for f in pickles
    ):
        raise CmmergeError(
            f"{model_dir} holds only pickle weights (pytorch_model.bin): refused because "
            "unpickling can run code; allow_pickle=true loads it (or re-save it as safetensors)"
        )


def model_kind(model_dir: Path, configured: str = "auto") -> ModelKind:
    """``encoder`` or ``decoder``: as configured, else from the config's model_type."""
    if configured in ("encoder", "decoder"):
        return configured  # type: ignore[return-value]
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise CmmergeError(
        f"model type {model_type!r} in {model_dir} is neither a masked-LM encoder nor a causal-LM "
        "decoder that cmmerge can train; set model.kind=encoder|decoder if you know better"
    )


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer, with a pad token (decoders often lack one: EOS is used)."""
    from transformers import AutoTokenizer

    from cmmerge.io.transaction import pruned_output

    stage = None if Path(model_dir).exists() else pruned_output(Path(model_dir))
    if stage is not None:
        raise CmmergeError(
            f"{model_dir} was deleted after use (keep_merged=false / keep_models=false; "
            f"{stage / 'pruned.json'}): run the stage that made {stage.name} again with "
            "force=true (cmmerge pipeline and cmmerge sweep do that themselves)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as err:
        raise CmmergeError(
            f"cannot load a tokenizer from {model_dir} ({type(err).__name__}): copy the base "
            "model's tokenizer files into it"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CmmergeError(f"tokenizer in {model_dir} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_finite(model, model_dir: Path) -> None:
    """Refuse a model holding NaN or infinite weights: training from it cannot give a model."""
    import torch

    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CmmergeError(
            f"{model_dir} holds NaN or infinite weights in {len(bad)} tensor(s) ({shown}): "
            "it cannot be trained or evaluated"
        )


def _log_new_weights(model_dir: Path, info: dict) -> None:
    new = sorted(info.get("missing_keys") or [])
    if new:
        log.info(
            "%s: %d tensor(s) not in the checkpoint, newly initialised: %s",
            model_dir,
            len(new),
            ", ".join(new[:8]) + (" ..." if len(new) > 8 else ""),
        )


def load_lm(model_dir: Path, kind: ModelKind):
    """Masked-LM (encoder) or causal-LM (decoder) model for CPT, with finite weights.

    A bare encoder (``BertModel``, ``XLMRobertaModel``: keys without the ``bert.`` prefix, no
    MLM head) gets a newly initialised MLM head (seed the RNG first); the tensors added are
    logged."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if kind == "encoder" else AutoModelForCausalLM
    model, info = cls.from_pretrained(model_dir, dtype="float32", output_loading_info=True)
    _log_new_weights(model_dir, info)
    check_finite(model, model_dir)
    return model


def _load_labelled(model_dir: Path, labels: list[str], pad_token_id: int | None, token: bool):
    """A sequence (``token=False``) or token classifier over ``labels`` with finite weights; a
    head of the same kind but another size is an error. A new head is initialised from the global
    RNG: seed it first."""
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    kind = "ForTokenClassification" if token else "ForSequenceClassification"
    config = AutoConfig.from_pretrained(model_dir)
    has_head = any(a.endswith(kind) for a in config.architectures or [])
    if has_head and config.num_labels != len(labels):
        raise CmmergeError(
            f"{model_dir} has a {'token ' if token else ''}classification head for "
            f"{config.num_labels} labels, the task has {len(labels)} ({', '.join(labels)})"
        )
    id2label = dict(enumerate(labels))
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    model, info = auto.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        dtype="float32",
        output_loading_info=True,
        # a token classifier from, e.g., a sentence classifier: its head has the same name
        ignore_mismatched_sizes=token and not has_head,
    )
    _log_new_weights(model_dir, info)
    check_finite(model, model_dir)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def load_classifier(model_dir: Path, labels: list[str], pad_token_id: int | None):
    """Sequence classifier over ``labels``, with finite weights; a head of another size is an
    error. A new head is initialised from the global RNG: seed it first."""
    return _load_labelled(model_dir, labels, pad_token_id, token=False)


def load_token_classifier(model_dir: Path, labels: list[str], pad_token_id: int | None):
    """Token classifier (one label per token) over ``labels``, with finite weights; a token
    head of another size is an error, any other head is left out. A new head is initialised from
    the global RNG: seed it first."""
    return _load_labelled(model_dir, labels, pad_token_id, token=True)


_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert")


def check_max_length(config, max_length: int, key: str, where: Path) -> None:
    """Refuse a ``max_length`` longer than the positions the model has (one line naming the
    key), instead of an index error deep in the forward pass."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:  # positions start after padding
        limit -= int(getattr(config, "pad_token_id", None) or 1) + 1
    if max_length > limit:
        raise CmmergeError(
            f"{key}={max_length} is longer than the {limit} positions of the model in {where}: "
            f"set {key}={limit} or less"
        )
