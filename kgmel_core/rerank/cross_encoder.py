"""The learned reranker: a cross-encoder that reads a mention and one candidate together.

The retriever embeds each side alone, so two people called "John Smith" stay close whatever the
sentence says about one of them; a cross-encoder attends across both texts at once (BLINK's
bi-encoder -> cross-encoder). It starts from a packaged sentence encoder (MiniLM, or mpnet) with a
fresh linear head on the [CLS] position, one score per (mention, candidate) pair, and is fine-tuned
on the train split with a listwise softmax over the gold entity and the retriever's own top-ranked
wrong candidates: the negatives it will face when serving.

Both texts are short by design: the cost is quadratic in their length and paid K times per mention.
The mention is its sentence with the mention marked in place; a candidate is its label, a cut
description and the KB facts stage 3's filter kept for this mention.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kgmel_core.config import CrossEncoderConfig
from kgmel_core.data.texts import window_start
from kgmel_core.retrieval.device import (
    autocast,
    cpu_lanes,
    in_cpu_lanes,
    inference,
    resolve_device,
    resolved_precision,
)
from kgmel_core.retrieval.torch_compat import import_torchvision


@dataclass
class RerankGroup:
    """One mention and its candidates, in retrieval order: what the reranker scores together."""

    mention_id: str
    mention_text: str
    qids: list[str]
    candidate_texts: list[str]
    retrieval_scores: np.ndarray  # float32 [K]
    gold: int | None = None  # position of the gold entity among the candidates; None: absent or unknown


@dataclass
class MentionText:
    text: str
    truncated: bool  # the sentence was cut to the character limit (counted by the caller)


def mention_input(mention: str, sentence: str, max_chars: int, description: str | None = None,
                  facts: Sequence[tuple[str, str]] = ()) -> MentionText:
    """The sentence with the mention marked where it occurs (`... [ Jordan ] scored ...`), else the
    mention before it; stage 1's description and triples after it when it ran. Sentences longer
    than `max_chars` keep a window around the mention."""
    at = sentence.find(mention) if mention else -1
    truncated = len(sentence) > max_chars
    if truncated:
        start = window_start(len(sentence), max(at, 0), max_chars)
        sentence, at = sentence[start : start + max_chars], (at - start if at >= 0 else -1)
        at = at if at >= 0 and at + len(mention) <= len(sentence) else -1
    text = f"{sentence[:at]}[ {mention} ]{sentence[at + len(mention):]}" if at >= 0 else f"{mention} ; {sentence}"
    if description:
        text += f" ; {description}"
    if facts:
        text += " ; " + "; ".join(f"{relation}: {tail}" for relation, tail in facts)
    return MentionText(text, truncated)


def candidate_input(label: str, description: str | None, facts: Sequence[tuple[str, str]],
                    max_description_chars: int) -> str:
    """`label ; description ; relation: tail; ...` with the description cut at a word boundary."""
    parts = [label]
    if description and max_description_chars:
        cut = description if len(description) <= max_description_chars else (
            description[:max_description_chars].rsplit(" ", 1)[0]
        )
        parts.append(cut)
    if facts:
        parts.append("; ".join(f"{relation}: {tail}" for relation, tail in facts))
    return " ; ".join(parts)


# Pairs per forward pass in training. Fewer pairs pad less but multiply smaller matrices.
TRAIN_PAIRS_PER_FORWARD = 16


def lane_batch_size(pairs: int, batch_pairs: int, lanes: int) -> int:
    """At most `batch_pairs` a batch, in a number of batches the lanes share evenly: one mention's 16 pairs
    at 32 would be one batch and leave a lane idle; as two batches of 8 they run at once."""
    batches = math.ceil(math.ceil(pairs / batch_pairs) / lanes) * lanes
    return max(1, math.ceil(pairs / batches)) if batches else batch_pairs


class CrossEncoder:
    """A transformers sequence-classification model with one output, and its tokenizer."""

    def __init__(self, path: str | os.PathLike[str], max_length: int, device: str = "auto",
                 precision: str = "auto"):
        import_torchvision()  # transformers imports torchvision when it is installed
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # a fresh head's "newly initialized" report is expected, not news
        self.device = resolve_device(device)
        self.precision = resolved_precision(precision, self.device)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1).to(self.device)

    def _tokenize(self, firsts: list[str], seconds: list[str], **options):
        """The pairs cut as the model reads them; the one place that says how, so counts match batches."""
        return self.tokenizer(firsts, seconds, truncation="longest_first", max_length=self.max_length, **options)

    def _tokens(self, firsts: list[str], seconds: list[str]):
        return self._tokenize(firsts, seconds, padding=True, return_tensors="pt").to(self.device)

    def word_pieces(self, firsts: list[str], seconds: list[str]) -> list[int]:
        """Each pair's length in word pieces as `_tokens` cuts it: what its batch pads to."""
        if not firsts:
            return []
        return self._tokenize(firsts, seconds, return_attention_mask=False, return_token_type_ids=False,
                              return_length=True)["length"]

    def _forward(self, tokens) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self.model(**tokens).logits.squeeze(-1).float()

    def _logits(self, firsts: list[str], seconds: list[str]) -> torch.Tensor:
        """One logit per pair, in the order given, computed in word-piece-sorted parts of at most
        `TRAIN_PAIRS_PER_FORWARD` pairs: one batch of a step's mixed pairs pads to the longest of them
        (1.65 times the real word pieces on WikiDiverse's training steps; docs/results.md)."""
        pieces = np.asarray(self.word_pieces(firsts, seconds), dtype=np.int64)
        order = np.argsort(pieces, kind="stable")
        parts = [self._forward(self._tokens([firsts[i] for i in rows], [seconds[i] for i in rows]))
                 for rows in np.array_split(order, max(1, math.ceil(len(order) / TRAIN_PAIRS_PER_FORWARD)))]
        return torch.cat(parts)[torch.from_numpy(np.argsort(order, kind="stable")).to(parts[0].device)]

    def score(self, groups: Sequence[RerankGroup], batch_pairs: int, progress: bool = False) -> list[np.ndarray]:
        """One score per candidate of every group. Pairs are batched across groups in order of their
        word pieces (counted: characters sort them too loosely), so a batch pads little; on a CPU two
        batches run at once (`device.in_cpu_lanes`; a single mention's pairs are split in two for it),
        tokenised one at a time because a fast tokenizer is not thread-safe."""
        self.model.eval()
        pairs = [(g, i) for g, group in enumerate(groups) for i in range(len(group.qids))]
        pieces = self.word_pieces([groups[g].mention_text for g, _ in pairs],
                                  [groups[g].candidate_texts[i] for g, i in pairs])
        order = np.argsort(np.asarray(pieces, dtype=np.int64), kind="stable").tolist()
        flat = np.zeros(len(pairs), np.float32)
        size = lane_batch_size(len(order), batch_pairs, cpu_lanes(self.device))
        chunks = [order[start : start + size] for start in range(0, len(order), size)]
        tokenizer_lock = threading.Lock()

        def score_chunks(chunks: Sequence[list[int]]) -> None:
            with inference(self.precision, self.device):
                for chunk in chunks:
                    firsts = [groups[pairs[p][0]].mention_text for p in chunk]
                    seconds = [groups[pairs[p][0]].candidate_texts[pairs[p][1]] for p in chunk]
                    with tokenizer_lock:
                        tokens = self._tokens(firsts, seconds)
                    flat[chunk] = self._forward(tokens).cpu().numpy()
                    bar.update(1)

        with tqdm(total=len(chunks), desc="rerank", unit="batch", disable=not progress or len(chunks) < 2) as bar:
            in_cpu_lanes(self.device, chunks, score_chunks)
        out, at = [], 0
        for group in groups:
            out.append(flat[at : at + len(group.qids)])
            at += len(group.qids)
        return out

    def listwise_loss(self, groups: Sequence[RerankGroup], negatives: int) -> torch.Tensor:
        """Softmax cross-entropy of each group's gold against its first `negatives` wrong candidates
        (the retriever's best-ranked mistakes), averaged over the groups."""
        firsts, seconds, sizes = [], [], []
        for group in groups:
            keep = [group.gold] + [i for i in range(len(group.qids)) if i != group.gold][:negatives]
            firsts += [group.mention_text] * len(keep)
            seconds += [group.candidate_texts[i] for i in keep]
            sizes.append(len(keep))
        logits = self._logits(firsts, seconds)
        losses = [torch.logsumexp(part, 0) - part[0] for part in torch.split(logits, sizes)]
        return torch.stack(losses).mean()

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW over every weight but the word embeddings: they hold half the parameters, a few thousand
        mentions cannot move them usefully, and leaving them out spares the optimizer half its work."""
        self.model.get_input_embeddings().weight.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, fused=True)  # one kernel for all tensors

    def train_step(self, optimizer: torch.optim.Optimizer, groups: Sequence[RerankGroup], negatives: int) -> float:
        """One optimisation step on the listwise loss of `groups`; returns the loss."""
        self.model.train()
        loss = self.listwise_loss(groups, negatives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def save(self, folder: str | os.PathLike[str]) -> None:
        """transformers' own layout (`save_pretrained`): the folder loads back with `CrossEncoder(folder, ...)`."""
        self.model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))


def gold_margin(group: RerankGroup) -> float:
    """How far the retriever put the gold entity ahead of its best wrong candidate (negative: behind)."""
    others = np.delete(group.retrieval_scores, group.gold)
    return float(group.retrieval_scores[group.gold] - others.max())


def training_sample(usable: Sequence[RerankGroup], n: int, hard_share: float, rng: random.Random) -> list[RerankGroup]:
    """`n` training mentions: a `hard_share` of them those whose gold the retriever put least ahead (the
    mistakes and near-ties the reranker is for), the rest a random draw of the others (so it still sees
    what an easy list looks like)."""
    n = min(n, len(usable))
    hard = sorted(usable, key=gold_margin)[: round(hard_share * n)]
    chosen = {id(g) for g in hard}
    return hard + rng.sample([g for g in usable if id(g) not in chosen], n - len(hard))


@dataclass
class RerankerTrainResult:
    history: list[dict] = field(default_factory=list)  # one row per validation
    best_step: int = 0
    best_val_hits1: float = float("nan")
    steps: int = 0
    train_groups: int = 0
    seconds: float = 0.0
    precision: str = "fp32"


def train_cross_encoder(
    model: CrossEncoder,
    train: Sequence[RerankGroup],
    val: Sequence[RerankGroup],
    config: CrossEncoderConfig,
    validate: Callable[[list[np.ndarray]], float],
    checkpoint: Path,
) -> RerankerTrainResult:
    """Fine-tune on `train` (groups whose gold is among the candidates), `config.epochs` passes over a
    seeded sample of `config.train_mentions` groups, AdamW with linear warm-up and decay. Every
    `validate_every` steps the model scores `val` and `validate(scores)` says how good that is (the
    fused HITS@1 the stage will serve); the best model is kept in `checkpoint`, and training stops
    after `patience` validations without improvement."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    usable = [g for g in train if g.gold is not None and len(g.qids) > 1]
    if not usable:
        raise ValueError("no training mention has its gold entity among its candidates: nothing to learn from")
    sample = training_sample(usable, config.train_mentions, config.hard_share, rng)
    steps_per_epoch = math.ceil(len(sample) / config.batch_mentions)
    total = steps_per_epoch * config.epochs
    optimizer = model.optimizer(config.lr)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    result = RerankerTrainResult(steps=0, train_groups=len(sample), precision=model.precision)
    started, stale, losses = time.perf_counter(), 0, []
    bar = tqdm(total=total, desc="train reranker", unit="step")
    for epoch in range(config.epochs):
        order = list(sample)
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_mentions):
            losses.append(model.train_step(optimizer, order[start : start + config.batch_mentions], config.negatives))
            schedule.step()
            result.steps += 1
            bar.update()
            last = result.steps == total
            if result.steps % config.validate_every and not last:
                continue
            quality = validate(model.score(val, config.batch_pairs))
            row = {"step": result.steps, "epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                   "val_hits1": quality, "seconds": time.perf_counter() - started}
            losses = []
            result.history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_h1=f"{quality:.2f}")
            if not result.best_step or quality > result.best_val_hits1:
                result.best_step, result.best_val_hits1, stale = result.steps, quality, 0
                model.save(checkpoint)
            else:
                stale += 1
                if stale >= config.patience:
                    break
        if stale >= config.patience:
            break
    bar.close()
    result.seconds = time.perf_counter() - started
    return result
