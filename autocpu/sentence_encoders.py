"""sentence-transformers: tune the transformer inside a ``SentenceTransformer`` in place.

``st.encode`` calls the first module's model; replacing that model with the tuned one makes
every ``encode`` (pooling and normalisation unchanged) run on the plan. The attribute to replace
differs by version: ``Transformer.auto_model`` is a read-only property over ``.model`` in 5.x
(assigning it silently does nothing there), a plain attribute before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autocpu.api import tune
from autocpu.errors import AutocpuError
from autocpu.tuned import TunedModel

#: Sentences per example batch, as ``SentenceTransformer.encode`` batches them by default.
ENCODE_BATCH_SIZE = 32


def tune_sentence_transformer(
    model: Any, sentences: Sequence[str], *, batch_size: int = ENCODE_BATCH_SIZE, **options: Any
) -> TunedModel:
    """Tune ``model``'s transformer on ``sentences`` (tokenized as ``encode`` tokenizes them,
    in batches of ``batch_size``) and put the tuned model in its place.

    ``options`` are :func:`autocpu.tune`'s. Returns the tuned model (``.plan``, ``.explain()``);
    ``model.encode`` runs on it from then on.
    """
    module = _transformer_module(model)
    texts = [sentences] if isinstance(sentences, str) else list(sentences)
    if not texts or not all(isinstance(text, str) for text in texts):
        raise AutocpuError(
            "sentences must be a non-empty list of strings",
            "pass a few sentences like those the model will encode",
        )
    tokenizer = module.tokenizer
    batches = [
        dict(
            tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=module.max_seq_length,
                return_tensors="pt",
            )
        )
        for start in range(0, len(texts), batch_size)
    ]
    tuned = tune(_inner_model(module), batches, **options)
    _replace_model(module, tuned)
    return tuned


def _transformer_module(model: Any) -> Any:
    """The ``Transformer`` module ``encode`` runs first, or a one-line error."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise AutocpuError(
            "sentence-transformers is not installed", "pip install sentence-transformers"
        ) from None
    if not isinstance(model, SentenceTransformer):
        raise AutocpuError(
            f"expected a SentenceTransformer, got {type(model).__name__}",
            "pass SentenceTransformer(path); for a transformers model call autocpu.tune(model)",
        )
    module = model[0]
    if getattr(module, "tokenizer", None) is None or not hasattr(module, "max_seq_length"):
        raise AutocpuError(
            f"the first module of this SentenceTransformer is a {type(module).__name__}, "
            "not a text Transformer",
            "tune its transformers model with autocpu.tune(model[0].model, inputs)",
        )
    return module


def _inner_model(module: Any) -> Any:
    inner = getattr(module, "model", None)
    return inner if inner is not None else module.auto_model


def _replace_model(module: Any, tuned: TunedModel) -> None:
    """Assign where ``encode`` reads it: ``.model`` when ``auto_model`` is a property over it."""
    if isinstance(getattr(type(module), "auto_model", None), property):
        module.model = tuned
    else:
        module.auto_model = tuned
