"""costaware.deploy: serving cost per request, lifetime dollars, value, and the model to deploy."""

import pytest
import torch
from torch import nn

from costaware.deploy import (
    Deployment,
    ServingTiming,
    group_examples,
    measure_serving_many,
    recommend,
    serving_cost,
    serving_examples,
    slice_batch,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _timing(ms_per_example, p95_ms=None):
    return ServingTiming(latency_ms_per_example=ms_per_example, request_p95_ms=p95_ms or ms_per_example,
                         throughput_per_s=1000.0 / ms_per_example, examples=10, device="cpu", batch_size=1)


def test_serving_cost_arithmetic():
    # 36 ms per example at $0.10 an hour: 1,000 requests take 36 s = $0.001.
    deployment = Deployment(requests=2_000_000, usd_per_hour=0.10, usd_per_point=0.5)
    cost = serving_cost("teacher", _timing(36.0), deployment, train_usd=0.25, metric=0.9)
    assert cost.usd_per_1k_requests == pytest.approx(0.001)
    assert cost.serving_usd == pytest.approx(2.0)
    assert cost.lifetime_usd == pytest.approx(2.25)
    assert cost.value_usd == pytest.approx(90 * 0.5 - 2.25)
    assert cost.meets_sla
    # A metric to minimise counts its points negatively; the policy's price is used when the deployment has none.
    loss = serving_cost("student", _timing(36.0), Deployment(requests=1000, usd_per_hour=0.1), 0.0, 0.3, mode="min",
                        usd_per_point=2.0)
    assert loss.value_usd == pytest.approx(-30 * 2.0 - 0.001)
    # Points as the policy counts them: with points_per_unit=1 (a loss in nats), 0.3 is 0.3 points.
    nats = serving_cost("student", _timing(36.0), Deployment(requests=1000, usd_per_hour=0.1), 0.0, 0.3, mode="min",
                        usd_per_point=2.0, points_per_unit=1.0)
    assert nats.value_usd == pytest.approx(-0.3 * 2.0 - 0.001)
    fields = cost.to_fields()
    assert fields["lifetime_usd"] == cost.lifetime_usd and fields["role"] == "teacher"


def test_recommend_by_value_and_sla():
    deployment = Deployment(requests=10_000_000, usd_per_hour=0.10, usd_per_point=1.0, sla_ms=20.0)
    teacher = serving_cost("teacher", _timing(30.0), deployment, train_usd=0.2, metric=0.90)
    student = serving_cost("student", _timing(10.0), deployment, train_usd=0.3, metric=0.88)
    # The teacher's 2 points are worth $2; the student saves $55.6 of serving: the student pays.
    no_sla = Deployment(requests=10_000_000, usd_per_hour=0.10, usd_per_point=1.0)
    costs = [serving_cost(c.role, _timing(c.latency_ms_per_example), no_sla, c.train_usd, c.metric)
             for c in (teacher, student)]
    role, reason = recommend(costs, no_sla)
    assert role == "student" and "more than the teacher" in reason and "metric -0.02" in reason
    # At a few requests, serving costs nothing next to the points: the teacher.
    few = Deployment(requests=1000, usd_per_hour=0.10, usd_per_point=1.0)
    costs = [serving_cost(r, _timing(ms), few, usd, m) for r, ms, usd, m in
             (("teacher", 30.0, 0.2, 0.90), ("student", 10.0, 0.3, 0.88))]
    assert recommend(costs, few)[0] == "teacher"
    # The SLA rules out the teacher (30 ms > 20 ms) whatever its value.
    assert teacher.meets_sla is False and student.meets_sla is True
    role, reason = recommend([teacher, student], deployment)
    assert role == "student" and "over the 20 ms SLA: teacher" in reason
    slow = serving_cost("student", _timing(25.0), deployment, 0.3, 0.88)
    assert recommend([teacher, slow], deployment)[0] is None


def test_recommend_without_a_price_per_point_takes_the_cheapest_at_the_best_metric():
    deployment = Deployment(requests=10_000_000, usd_per_hour=0.1)
    costs = [serving_cost(r, _timing(ms), deployment, usd, m) for r, ms, usd, m in
             (("teacher", 30.0, 0.2, 0.90), ("student", 10.0, 0.3, 0.90), ("quantized", 5.0, 0.3, 0.85))]
    role, reason = recommend(costs, deployment)
    assert role == "student" and "no usd_per_point" in reason


def test_slice_and_group_trim_padding():
    batch = {"input_ids": torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6]]),
             "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), "labels": torch.tensor([0, 1])}
    first = slice_batch(batch, 0, 1)
    assert first["input_ids"].tolist() == [[1, 2]] and first["labels"].tolist() == [0]
    [regrouped] = group_examples([first, slice_batch(batch, 1, 2)], 2)
    assert regrouped["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert regrouped["attention_mask"].tolist() == batch["attention_mask"].tolist()
    pairs = slice_batch((torch.arange(6).view(3, 2), torch.tensor([0, 1, 0])), 1, 3)
    assert pairs[0].tolist() == [[2, 3], [4, 5]] and pairs[1].tolist() == [1, 0]


def test_serving_examples_are_spread_over_the_loader():
    loader = [torch.arange(10 * i, 10 * i + 10).view(10, 1).float() for i in range(10)]  # sorted, like eval loaders
    examples = serving_examples(loader, 5)
    assert [int(e.item()) for e in examples] == [0, 20, 40, 60, 80]
    assert len(serving_examples(loader, 500)) == 100 and serving_examples(None, 5) == []


def test_measure_serving_many_times_each_model_and_puts_it_back():
    models = {"wide": nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 2)), "narrow": nn.Linear(8, 2)}
    models["wide"].train()
    examples = [torch.randn(1, 8) for _ in range(6)]
    deployment = Deployment(requests=10, usd_per_hour=1.0, batch_size=4, repeats=2, threads=1)
    threads = torch.get_num_threads()
    timings = measure_serving_many(models, examples, lambda m, b: m(b), deployment)
    assert set(timings) == {"wide", "narrow"}
    for timing in timings.values():
        assert timing.latency_ms_per_example > 0 and timing.examples == 6 and timing.batch_size == 4
        assert timing.request_p95_ms >= timing.latency_ms_per_example  # a batch of 4 takes longer than one example
        assert timing.throughput_per_s == pytest.approx(1000.0 / timing.latency_ms_per_example)
    assert models["wide"].training and torch.get_num_threads() == threads
    assert measure_serving_many(models, [], lambda m, b: m(b), deployment) == {}


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"requests": 0}, "requests"),
    ({"requests": 1.5}, "requests"),
    ({"usd_per_hour": -1}, "usd_per_hour"),
    ({"device": "tpu"}, "device"),
    ({"batch_size": 0}, "batch_size"),
    ({"sla_ms": 0}, "sla_ms"),
    ({"threads": 0}, "threads"),
    ({"usd_per_point": float("nan")}, "usd_per_point"),
    ({"examples": 0}, "examples"),
])
def test_bad_deployment(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Deployment(**{"requests": 1000, "usd_per_hour": 0.1, **kwargs})


def test_the_policy_hands_its_points_per_unit_to_the_strategies(ns):
    """A Deployment values models in the policy's points: a loss watched at points_per_unit=1."""
    policy = ns.costaware.MarginalGainStopping(monitor="val_loss", mode="min", usd_per_point=2.0, points_per_unit=1.0)
    trainer = ns.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    context = policy._context(trainer, None)
    assert (context.usd_per_point, context.points_per_unit) == (2.0, 1.0)
