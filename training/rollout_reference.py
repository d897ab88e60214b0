"""The pre-issue-16 HF rollout path, kept as a correctness and speed reference (tests, bench/rollout.py).

``model.generate`` greedy with :class:`training.sampling.SeededSampler` as the
last logits processor: every one of a prompt's G copies runs the vision tower
and the prefill again, every decode step sorts the full vocabulary and draws
per-row uniforms from CPU generators. The trainer does not use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from training.rollout import Generation, HFGenerateBackend, RolloutConfig
from training.sampling import SeededSampler


class ReferenceGenerateBackend(HFGenerateBackend):
    """``generate`` per chunk of ``generation_batch_size`` (prompt, g) sequences, as before the shared prefill."""

    def __init__(self, model: Any, tokenizer: Any, cfg: RolloutConfig, device: Any = "cpu") -> None:
        from transformers import GenerationConfig

        super().__init__(model, tokenizer, cfg, device)
        # Every field that would add a logits processor is pinned (Qwen ships a 1.05 repetition penalty).
        self.gen_config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos_id,
            pad_token_id=self.pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(
        self, rows: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]], seeds: Sequence[Sequence[int]]
    ) -> list[list[Generation]]:
        from transformers import LogitsProcessorList

        from training.data import collate, model_batch

        jobs = [(i, g) for i in range(len(examples)) for g in range(len(seeds[i]))]
        out: list[list[Generation | None]] = [[None] * len(s) for s in seeds]
        model = getattr(self.model, "module", self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = model.training
        model.eval()
        saved = base.generation_config
        base.generation_config = self.gen_config
        try:
            for start in range(0, len(jobs), self.cfg.generation_batch_size):
                chunk = jobs[start : start + self.cfg.generation_batch_size]
                batch = collate([examples[i] for i, _ in chunk], self.pad_id, padding_side="left")
                inputs = model_batch(batch, self.device)
                sampler = SeededSampler(
                    [seeds[i][g] for i, g in chunk], self.cfg.temperature, self.cfg.top_p, self.banned_ids
                )
                seqs = model.generate(**inputs, generation_config=self.gen_config,
                                      logits_processor=LogitsProcessorList([sampler]))
                new = seqs[:, inputs["input_ids"].shape[1] :].cpu().numpy()
                for (i, g), ids in zip(chunk, new, strict=True):
                    out[i][g] = self._finish(ids)
        finally:
            base.generation_config = saved
            model.train(was_training)
        return [[g for g in row if g is not None] for row in out]
