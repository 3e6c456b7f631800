"""Shared-prompt learner passes: each prompt group packed into one row ([prompt, c_1, ..., c_k]
under a block attention mask) gives the plain padded pass's token logprobs and gradients.

One in-process FSDP2 rank (gloo, fp32, CPU; no Ray) on the tiny Qwen2, a batch of groups with
different prompt and completion lengths, a loss-weight-0 padding copy, and a token budget small
enough that a group is split over rows in different micro-batches. Plus the planning itself.
"""

from __future__ import annotations

import random
from unittest import mock

import pytest
import torch

from learner.batch import TrainBatch, block_mask, micro_batches, pack, pad, prompt_rows, row_lengths
from learner.objectives import GRPOObjective

BUDGET = 40  # tokens per micro-batch: the 12-token prompt's group (12 + 31) needs two rows
GROUPS = [(7, [3, 9, 5, 1]), (12, [6, 11, 8, 2, 4]), (4, [10, 7, 3, 6])]  # (prompt length, completion lengths)
TOL = 1e-5


def make_batch(seed: int = 0) -> TrainBatch:
    """Group-contiguous batch; the driver's padding copy (of the last sequence, weight 0) at the end."""
    rng = random.Random(seed)
    prompt_ids, completion_ids, logprobs, advantages, weights = [], [], [], [], []
    for p, lens in GROUPS:
        prompt = [rng.randrange(3, 250) for _ in range(p)]
        for n in lens:
            prompt_ids.append(prompt)
            completion_ids.append([rng.randrange(3, 250) for _ in range(n)])
            logprobs.append([-rng.random() * 5 for _ in range(n)])
            advantages.append(rng.uniform(-1.5, 1.5))
            weights.append(1.0)
    batch = TrainBatch(prompt_ids, completion_ids, logprobs, advantages, weights)
    copy = batch.select([len(batch) - 1])
    copy.loss_weights = [0.0]
    return TrainBatch(*(a + b for a, b in zip(
        (batch.prompt_ids, batch.completion_ids, batch.rollout_logprobs, batch.advantages, batch.loss_weights),
        (copy.prompt_ids, copy.completion_ids, copy.rollout_logprobs, copy.advantages, copy.loss_weights))))


# --------------------------------------------------------------------------- planning (no model)


@pytest.mark.parametrize("budget", [8, 16, 25, 40, 1000])
def test_rows_and_micro_batches_cover_every_sequence_once_within_the_budget(budget):
    batch = make_batch()
    rows = prompt_rows(batch, budget)
    assert [i for row in rows for i in row] == list(range(len(batch)))  # every sequence once, in order
    lengths = row_lengths(batch, rows)
    for row, n in zip(rows, lengths):
        assert all(batch.prompt_ids[i] == batch.prompt_ids[row[0]] for i in row)  # one prompt per row
        assert n <= budget or len(row) == 1  # only a lone sequence may exceed the budget
    mbs = micro_batches(lengths, budget)
    assert sorted(r for mb in mbs for r in mb) == list(range(len(rows)))
    for mb in mbs:
        assert len(mb) == 1 or len(mb) * max(lengths[r] for r in mb) <= budget
    assert prompt_rows(batch, budget, share=False) == [[i] for i in range(len(batch))]


def test_rows_split_a_group_and_keep_padding_copies_with_their_group():
    batch = make_batch()
    rows = prompt_rows(batch, BUDGET)
    assert [len(r) for r in rows] == [4, 4, 1, 5]  # the 12-token group splits 12+27 | 12+4; the copy joins its group
    assert rows[-1][-1] == len(batch) - 1
    assert prompt_rows(batch, 10_000) == [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]


def test_packed_rows_carry_a_token_mask_as_the_plain_rows_do():
    """Multi-turn data in the shared layout: a group split over rows, and the padding copy, keep
    each sequence's token mask on its own completion tokens, as the plain padded rows do (the
    objectives read only `mask`, so both layouts train the same tokens)."""
    batch = make_batch()
    rng = random.Random(2)
    batch.token_mask = [[int(rng.random() < 0.6) for _ in c] for c in batch.completion_ids]
    batch.token_mask[-1] = batch.token_mask[-2]  # the padding copy's mask is its original's
    rows = prompt_rows(batch, BUDGET)
    assert [len(r) for r in rows] == [4, 4, 1, 5]  # the 12-token group is split
    plain, shared = pad(batch, 0, "cpu"), pack(batch, rows, 0, "cpu")
    for s, i in enumerate(i for row in rows for i in row):
        c, m = batch.completion_ids[i], batch.token_mask[i]
        expected = [float(x) for x in m] if batch.loss_weights[i] > 0 else [0.0] * len(c)
        assert shared.mask[s][shared.completion[s] == 1].tolist() == expected
        assert plain.mask[i][plain.completion[i] == 1].tolist() == expected
        policy = [t for t, x in zip(c, expected) if x]  # the tokens trained on, in both layouts
        assert shared.targets[s][shared.mask[s] == 1].tolist() == policy
        assert plain.targets[i][plain.mask[i] == 1].tolist() == policy
    assert 0 < shared.mask.sum() < shared.completion.sum() - len(batch.completion_ids[-1])  # some masked out


def test_block_mask():
    """Prompt causal; each completion sees the prompt and its own past; padding sees itself only."""
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1]])
    allowed = block_mask(seg, torch.float32)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    blocked = block_mask(seg, torch.bfloat16)[0, 0]
    assert blocked.dtype == torch.bfloat16 and blocked.min() == torch.finfo(torch.bfloat16).min


@pytest.mark.parametrize("chunk", [0, 1, 5, 7, 64])
def test_chunked_logprobs_with_an_index_equal_gathering_first(chunk):
    """Slots scored through `index` (several slots on one position, unused positions) give the values
    and gradients of gathering the positions first and scoring them in the plain layout."""
    from learner.logprobs import chunked_logprobs

    g = torch.Generator().manual_seed(chunk)
    logits = torch.randn(2, 9, 11, generator=g, requires_grad=True)  # [rows, W, V]
    index = torch.randint(0, 18, (4, 5), generator=g)
    index[:, 0] = 3  # four first tokens scored by one position
    targets = torch.randint(0, 11, (4, 5), generator=g)
    w1, w2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    gathered = logits.reshape(18, 11)[index]  # [4, 5, 11]
    expected, expected_ent = chunked_logprobs(gathered, targets, 0.7, 0, entropy="grad")
    ((expected * w1).sum() + (expected_ent * w2).sum()).backward()
    grad, logits.grad = logits.grad.clone(), None
    got, ent = chunked_logprobs(logits, targets, 0.7, chunk, entropy="grad", index=index)
    ((got * w1).sum() + (ent * w2).sum()).backward()
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(ent, expected_ent, atol=1e-6)
    assert torch.allclose(logits.grad, grad, atol=1e-6)
    _, metric = chunked_logprobs(logits, targets, 0.7, chunk, entropy="metric", index=index)
    assert not metric.requires_grad and torch.allclose(metric, expected_ent, atol=1e-6)


# --------------------------------------------------------------------------- shared == plain


@pytest.fixture(scope="module")
def worker(tiny_model):
    """One fp32 rank in this process (one process group per process: shared by the module's tests)."""
    from learner.spec import LearnerSpec
    from learner.worker import LearnerWorker, free_port

    w = LearnerWorker(0, 1)
    with mock.patch("ray.get_gpu_ids", return_value=[]):  # no Ray here: the CPU
        w.setup(f"127.0.0.1:{free_port()}", LearnerSpec(
            model_path=tiny_model, lr=1e-3, micro_batch_tokens=BUDGET,
            objective=GRPOObjective(kl_coef=0.1, entropy_coef=0.01), temperature=0.8, logits_chunk=5,
            cpu_threads=torch.get_num_threads(), share_prompts=True))
    assert w.share_prompts  # tiny Qwen2 runs sdpa
    yield w
    w.shutdown()


def grads_of_one_step(worker, batch, share: bool):
    """(metrics, {name: full gradient}) of one train_step's backward, without the optimizer update."""
    from learner.worker import _full

    worker.share_prompts = share
    grads = {}

    def capture() -> float:
        grads.update({n: _full(p.grad).detach().clone() for n, p in worker.model.named_parameters()})
        worker.optimizer.zero_grad(set_to_none=True)
        return 0.0

    with mock.patch.object(worker, "_clip_and_step", capture):
        metrics = worker.train_step(batch)
    return metrics, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_logprobs_equal_the_plain_pass(worker, attention):
    batch = make_batch()
    worker.model.set_attn_implementation(attention)
    try:
        worker.share_prompts = False
        plain = worker.logprobs(batch)
        worker.share_prompts = True
        plan = worker._micro_plan(batch)
        shared = worker.logprobs(batch)
    finally:
        worker.model.set_attn_implementation("sdpa")
    where = {i: m for m, mb in enumerate(plan) for row in mb for i in row}
    assert where[4] != where[8], "the split group's rows should fall in different micro-batches"
    assert [len(x) for x in shared] == [len(c) for c in batch.completion_ids]
    diff = max(abs(a - b) for p, s in zip(plain, shared) for a, b in zip(p, s))
    assert diff < TOL, f"max |logp_shared - logp_plain| = {diff:.2e}"


def test_shared_gradients_equal_the_plain_pass(worker):
    """Same GRPO objective (clipped surrogate + KL to the reference + entropy bonus), one backward:
    every parameter's gradient equal within TOL, absolute (gradients here are O(0.01-1))."""
    batch = make_batch(1)
    plain_metrics, plain = grads_of_one_step(worker, batch, share=False)
    shared_metrics, shared = grads_of_one_step(worker, batch, share=True)
    worker.share_prompts = True
    assert plain.keys() == shared.keys() and max(g.abs().max() for g in plain.values()) > 1e-3
    worst = max(((shared[n] - g).abs().max().item(), n) for n, g in plain.items())
    assert worst[0] < TOL, f"max |grad_shared - grad_plain| = {worst[0]:.2e} ({worst[1]})"
    for key in ("loss", "entropy", "logprob_mismatch", "kl_ref"):
        assert abs(shared_metrics[key] - plain_metrics[key]) < TOL, key
    assert 0 <= shared_metrics["padding_frac"] < 1 and 0 <= plain_metrics["padding_frac"] < 1


@pytest.mark.parametrize("impl, asked, used", [("sdpa", True, True), ("eager", True, True),
                                               ("flash_attention_2", True, False), ("sdpa", False, False)])
def test_sharing_needs_an_attention_that_takes_a_4d_mask(impl, asked, used):
    from types import SimpleNamespace

    from learner.worker import LearnerWorker

    stub = SimpleNamespace(rank=1, model=SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl)))
    LearnerWorker._choose_layout(stub, asked, torch.float32)
    assert stub.share_prompts is used
