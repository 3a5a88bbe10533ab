"""data.packing: a micro-batch's examples packed into rows with per-example position ids give
every example the loss and gradient it has unpacked (attention kept apart), and a packed run
trains step for step like the padded one."""

import pytest
import torch
import torch.nn.functional as F

from plora_ray.config.data import SourceConfig
from plora_ray.config.names import IGNORE
from plora_ray.run.data import collate, load_examples, pack
from plora_ray.run.loop import fit, setup, train_step
from plora_ray.run.loss import loss_positions, loss_sum, packing_isolated
from plora_ray.run.models import build_model


@pytest.fixture(scope="module")
def tiny():
    from plora_ray.config.io import build_run_config

    cfg = build_run_config({"name": "t", "method": "lora", "model": {"name_or_path": "tiny", "dtype": "float32"}})
    model, tok = build_model(cfg)
    return model, tok, load_examples(["tiny-dialogues"], tok, 96)[:6]


def test_pack_keeps_each_examples_targets_and_restarts_positions(tiny):
    _, tok, examples = tiny
    padded, packed = collate(examples, tok.pad_token_id), pack(examples, 96 * 2, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # rows hold several examples
    assert int(packed["tokens"]) == int(padded["tokens"]) == sum(len(e["input_ids"]) for e in examples)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # no padding to the longest
    starts = packed["position_ids"] == 0
    assert int(starts.sum()) >= len(examples)  # one restart per example (+ a padded tail's)

    def targets(batch):  # (context tokens, target) pairs the loss scores
        pos, tgt = loss_positions(batch["labels"])
        out = []
        for b in range(pos.shape[0]):
            row_start = batch["position_ids"][b] if "position_ids" in batch else None
            for p, t in zip(pos[b].tolist(), tgt[b].tolist()):
                if t == IGNORE:
                    continue
                begin = p - int(row_start[p]) if row_start is not None else 0
                out.append((tuple(batch["input_ids"][b, begin: p + 1].tolist()), t))
        return sorted(out)

    assert targets(packed) == targets(padded)


def per_example_losses(model, batch, examples):
    """Each example's summed next-token loss, from one forward over ``batch``."""
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch},
                   use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE,
                         reduction="none")
    if "position_ids" not in batch:
        return sorted(ce.sum(1).tolist())
    seg = (batch["position_ids"] == 0).cumsum(1)[:, 1:]  # the segment each target belongs to
    sums = [ce[b][seg[b] == s].sum().item() for b in range(ce.shape[0]) for s in seg[b].unique().tolist()]
    return sorted(x for x in sums if x != 0.0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_unpacked(attn):
    from plora_ray.config.io import build_run_config

    cfg = build_run_config({"name": "t", "method": "lora", "model": {
        "name_or_path": "tiny", "dtype": "float32", "attn_implementation": attn}})
    model, tok = build_model(cfg)
    examples = load_examples(["tiny-dialogues"], tok, 96)[:6]
    padded, packed = collate(examples, tok.pad_token_id), pack(examples, 192, tok.pad_token_id)
    want, got = per_example_losses(model, padded, examples), per_example_losses(model, packed, examples)
    assert len(want) == len(got) == len(examples)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batch):
        model.zero_grad(set_to_none=True)
        loss_sum(model, batch).backward()
        return [p.grad.clone() for p in params]

    for a, b in zip(grads(padded), grads(packed)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


class DropsPositions(torch.nn.Module):
    """A model that ignores position ids (as one without padding-free support would)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, **kw):
        return self.model(input_ids=input_ids, **kw)


def test_isolation_probe_tells_kept_apart_from_mixed(tiny):
    model, tok, examples = tiny
    assert packing_isolated(model, examples, tok.pad_token_id, torch.device("cpu"))
    assert not packing_isolated(DropsPositions(model), examples, tok.pad_token_id, torch.device("cpu"))


def test_packed_run_trains_step_for_step_like_the_padded_one(tiny_cfg, capfd):
    def losses(packing):
        run = setup(tiny_cfg(data={"packing": packing, "max_length": 64}, plora={"unload_every_steps": 2},
                             optim={"lr": 1e-2}))
        return [train_step(run, mb)["loss"] for mb in run.steps[:5]]  # two unloads on the way

    padded, packed = losses(False), losses(True)
    assert "does not keep packed examples apart" not in capfd.readouterr().err
    assert torch.allclose(torch.tensor(packed), torch.tensor(padded), rtol=1e-4)


def test_source_weights_repeat_and_subsample_rows(tiny):
    from plora_ray.run.data import weighted_rows

    _, tok, _ = tiny
    one = load_examples(["tiny-dialogues"], tok, 96, cache=False)
    mixed = load_examples([SourceConfig(path="tiny-dialogues", weight=2.0),
                           SourceConfig(path="tiny-dialogues", weight=0.5)], tok, 96, cache=False)
    n = len(one)
    assert len(mixed) == 2 * n + round(0.5 * n)
    assert mixed[:n] == one[:n] and mixed[n: 2 * n] == one[:n]  # weight 2: every row twice
    half = weighted_rows(n, 0.5, "1/tiny-dialogues")
    assert len(set(half.tolist())) == len(half) and (half == weighted_rows(n, 0.5, "1/tiny-dialogues")).all()
    assert mixed[2 * n:] == [one[i] for i in half.tolist()]  # a seeded subset, in file order


def test_fit_with_packing_and_weighted_sources(tiny_cfg):
    cfg = tiny_cfg(data={"packing": True, "max_steps": 3, "sources": [
        {"path": "tiny-dialogues", "weight": 2.0}, {"path": "tiny-dialogues", "weight": 0.5}]})
    run = fit(setup(cfg), progress=False)
    assert run.clock.steps == 3 and len(run.steps) == 3
