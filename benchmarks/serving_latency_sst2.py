"""Serving latency of the SST-2 teacher and its truncated students: batch 1, one CPU thread.

Latency does not depend on the trained weights, so the models are built from the packaged
MiniLM without training: the LoRA teacher of ``examples/marginal_gain_sst2.py`` (adapters
unmerged, as it is served after training), the same teacher with its adapters merged, and
``TruncatedStudent(layers=k)`` copies, each in float32 and in torch's dynamic int8. All are timed
with ``costaware.deploy.measure_serving_many`` in interleaved rounds on sentences drawn across
SST-2's test set (each batch counts its fastest round), so that other work on the machine slows
them alike.

Example::

    python benchmarks/serving_latency_sst2.py --examples 128 --repeats 5 > benchmarks/results/serving_latency_sst2.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import torch

from costaware.deploy import Deployment, measure_serving_many, serving_examples
from costaware.strategies.base import cpu_copy
from costaware.strategies.batches import call_model, split_batch
from costaware.strategies.conversion import torch_dynamic_int8
from costaware.strategies.students import TruncatedStudent, merge_adapters
from data import read_sst2, sst2_dir, sst2_loader
from lora_sst2 import SST2Classifier, lora_encoder, model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    weights = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(weights))
    sentences, labels = read_sst2(sst2_dir() / "test.tsv")
    examples = serving_examples(sst2_loader(tokenizer, sentences, labels, batch_size=64), args.examples)
    teacher = SST2Classifier(lora_encoder(weights)).eval()
    models = {"teacher (LoRA unmerged)": teacher, "teacher (LoRA merged)": merge_adapters(cpu_copy(teacher))}
    for k in args.layers:
        models[f"student, {k} layer{'s' if k > 1 else ''}"] = TruncatedStudent(layers=k)(teacher).eval()
    for name in list(models):
        if "unmerged" not in name:
            quantized = cpu_copy(models[name])
            torch_dynamic_int8(quantized)
            models[f"{name}, torch int8"] = quantized
    deployment = Deployment(requests=1, usd_per_hour=0.0, batch_size=1, threads=1, examples=args.examples,
                            repeats=args.repeats)
    timings = measure_serving_many(models, examples, lambda m, b: call_model(m, split_batch(None, b)[0]), deployment)
    base = timings["teacher (LoRA unmerged)"].latency_ms_per_example
    print(f"{len(examples)} SST-2 test sentences, batch 1, 1 thread, {args.repeats} interleaved rounds, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'model':40s} {'params':>11s} {'ms/example':>11s} {'p95 ms':>8s} {'teacher/this':>13s}")
    for name, timing in timings.items():
        params = sum(p.numel() for p in models[name].parameters())
        print(f"{name:40s} {params:11,d} {timing.latency_ms_per_example:11.3f} {timing.request_p95_ms:8.3f} "
              f"{base / timing.latency_ms_per_example:12.2f}x")


if __name__ == "__main__":
    main()
