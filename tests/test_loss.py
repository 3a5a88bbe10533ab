"""The chunked loss equals the full-vocabulary cross-entropy it replaces: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from plora_ray.config.io import build_run_config
from plora_ray.run.data import collate, load_examples
from plora_ray.config.names import IGNORE
from plora_ray.run.loss import accepts_logits_to_keep, cross_entropy_sum, loss_positions, loss_sum
from plora_ray.run.models import build_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_f_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=g) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (37,), generator=g)
    labels[[0, 5, 36]] = IGNORE
    ref = logits.detach().clone().requires_grad_()
    want = F.cross_entropy(ref.float(), labels, ignore_index=IGNORE, reduction="sum")
    got = cross_entropy_sum(logits, labels, chunk=8)  # 37 rows: four chunks of 8 and one of 5
    (want * 0.37).backward()
    (got * 0.37).backward()
    assert logits.grad.dtype == dtype
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # bf16: at most one rounding step apart
    assert torch.allclose(logits.grad.float(), ref.grad.float(), rtol=tol, atol=1e-7)
    assert logits.grad[[0, 5, 36]].abs().max() == 0  # ignored rows get no gradient


def test_loss_positions_pick_the_labelled_next_tokens():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, IGNORE],
                           [IGNORE, 3, IGNORE, IGNORE, IGNORE]])
    positions, targets = loss_positions(labels)
    assert positions.tolist() == [[1, 2], [0, 0]]
    assert targets.tolist() == [[7, 8], [3, IGNORE]]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_and_gradients_equal_the_full_logits_loss(method):
    cfg = build_run_config({"name": "t", "method": method, "seed": 0,
                            "model": {"name_or_path": "tiny", "dtype": "float32"}})
    model, tok = build_model(cfg)
    assert accepts_logits_to_keep(model)
    examples = load_examples(["tiny-dialogues"], tok, 96)[:5]  # rows of different lengths: padding
    batch = collate(examples, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in params]

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    want_grads = grads(want)
    got = loss_sum(model, batch)
    got_grads = grads(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(got_grads, want_grads) if b.norm() > 0)
    assert worst < 1e-5
