"""The coordinator's own evaluation of the global model (``server_eval``): accuracy on held-out BBC
News test articles and, when configured, the general-ability probes and their retention against the
base model's scores (round 0)."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any

from fedbe.blocks import BlockState
from fedbe.expansion import BlockRegistry

log = logging.getLogger(__name__)


class ServerEvaluator:
    """Scores a model held by the coordinator; the test articles, tokenizer and probe are built on
    first use and kept (the same items every round)."""

    def __init__(self, settings: Any, model_source: str, max_tokens: int) -> None:
        self.settings, self.model_source, self.max_tokens = settings, model_source, max_tokens
        self._ready = False
        self._frozen: Any = None  # the model whose base was last frozen at settings.precision

    def _prepare(self) -> None:
        from fedbe import datasets, sources  # noqa: PLC0415
        from fedbe.general_ability import GeneralProbe  # noqa: PLC0415

        _, test = datasets.split_train_test(datasets.load_bbc_news())
        random.Random(0).shuffle(test)
        self.test = test[: self.settings.examples]
        self.labels = datasets.label_names(test)
        self.tokenizer = sources.load_tokenizer(self.model_source)
        questions, texts = self.settings.probe_questions, self.settings.probe_texts
        self.probe = GeneralProbe.build(questions, texts, split="test") if questions else None
        self._ready = True

    def score(self, model: Any, registry: BlockRegistry, state: BlockState, baseline: dict[str, Any] | None,
              base_model: bool = False) -> dict[str, Any]:  # fmt: skip
        """Score ``model`` with the blocks of ``state``; ``base_model`` scores the base instead (every new
        block bypassed). With a ``baseline`` (round 0's scores) the probes' retention is reported too."""
        from fedbe.blocks import set_block_state  # noqa: PLC0415
        from fedbe.evaluation import classification_accuracy  # noqa: PLC0415
        from fedbe.expansion import bypassed  # noqa: PLC0415
        from fedbe.general_ability import retention  # noqa: PLC0415

        if not self._ready:
            self._prepare()
        precision = self.settings.precision
        if precision != "fp32" and self._frozen is not model:
            from fedbe.quantization import freeze_base  # noqa: PLC0415

            freeze_base(model, registry, precision)  # blocks stay fp32, the base not
            self._frozen = model  # a new expansion loads a new model: frozen again then
        set_block_state(model, registry, state)
        started = time.monotonic()
        with bypassed(model, registry) if base_model else contextlib.nullcontext():
            accuracy = classification_accuracy(model, self.tokenizer, self.test, self.labels, self.max_tokens)
            probes = None if self.probe is None else self.probe.score(model, self.tokenizer)
        result: dict[str, Any] = {
            "dataset": "bbc-news", "examples": len(self.test), "accuracy": accuracy, "precision": precision,
        }  # fmt: skip
        if baseline is not None and not base_model:
            result["baseline_accuracy"] = baseline.get("accuracy")
        if self.probe is not None and probes is not None:
            result["probes"] = {**probes, "questions": len(self.probe.questions), "texts": len(self.probe.texts)}
            before = (baseline or {}).get("probes")
            if before is not None and not base_model:
                result["retention"] = retention(before, probes)
        result["seconds"] = time.monotonic() - started
        log.info(
            "server evaluation%s: accuracy %.3f on %d BBC News test articles%s (%.0f s)",
            " of the base model" if base_model else "", accuracy, len(self.test),
            "" if probes is None else
            f"; definitions {probes['definition_accuracy']:.3f}, perplexity {probes['perplexity']:.2f}"
            + ("".join(f", {k} {v:.3f}" for k, v in result.get("retention", {}).items())),
            result["seconds"],
        )  # fmt: skip
        return result
