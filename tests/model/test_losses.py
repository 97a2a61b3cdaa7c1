"""Router auxiliary losses against values computed by hand."""

import math

import torch

from molm_megatron.model.losses import (load_concentration_loss, mutual_information_loss, router_aux_losses,
                                        routing_regularization, switch_loss, z_loss)

PROBS = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])  # third token is padding in the masked tests
VALID = torch.tensor([True, True, False])


def h(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_mi_and_concentration_by_hand():
    # Valid tokens: p(e) = (0.75, 0.25); H(e|x) = (ln 2 + 0) / 2.
    assert math.isclose(load_concentration_loss(PROBS, VALID).item(), h(0.75, 0.25), rel_tol=1e-6)
    assert math.isclose(mutual_information_loss(PROBS, VALID).item(), math.log(2) / 2 - h(0.75, 0.25), rel_tol=1e-6)
    # Without a mask the padding row counts: p(e) = (1.7/3, 1.3/3).
    assert math.isclose(load_concentration_loss(PROBS, None).item(), h(1.7 / 3, 1.3 / 3), rel_tol=1e-6)


def test_switch_loss_by_hand():
    experts = torch.tensor([[0], [0], [1]])
    # f = (1, 0) over the two valid tokens, P = (0.75, 0.25): E * sum f P = 2 * 0.75.
    assert math.isclose(switch_loss(PROBS, experts, VALID).item(), 1.5, rel_tol=1e-6)
    # k = 2: every token picks both experts, f = (0.5, 0.5): 2 * (0.5 * 0.75 + 0.5 * 0.25) = 1.
    both = torch.tensor([[0, 1], [1, 0], [0, 1]])
    assert math.isclose(switch_loss(PROBS, both, VALID).item(), 1.0, rel_tol=1e-6)


def test_z_loss_and_routing_regularisation_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [9.0, 9.0]])
    lse = [math.log(2), math.log(math.e + math.e ** 2)]
    assert math.isclose(z_loss(logits, VALID).item(), (lse[0] ** 2 + lse[1] ** 2) / 2, rel_tol=1e-6)
    assert math.isclose(routing_regularization(torch.tensor([[3.0, 4.0]])).item(), 5.0)
    assert routing_regularization(torch.zeros(0, 4)).item() == 0.0


def test_all_losses_keyed():
    out = router_aux_losses(PROBS, PROBS.log().clamp(min=-30), torch.tensor([[0], [0], [1]]), VALID, torch.zeros(0, 2))
    assert set(out) == {"mi", "concentration", "switch", "z", "routing_reg"}


def test_steps_that_log_nothing_compute_only_the_weighted_losses():
    from molm_megatron.config import model_preset
    from molm_megatron.model import MoLM

    torch.manual_seed(0)
    cfg = model_preset("tiny", aux_loss_weight=0.3, z_loss_weight=0.1)
    model = MoLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    full = model(ids, labels=ids)
    weighted = model(ids, labels=ids, all_aux_losses=False)
    assert set(full.aux_losses) == {"mi", "concentration", "switch", "z", "routing_reg"}
    assert set(weighted.aux_losses) == {"mi", "z"}
    for name in ("mi", "z"):
        torch.testing.assert_close(weighted.aux_losses[name], full.aux_losses[name])
    torch.testing.assert_close(weighted.aux_loss, 0.3 * full.aux_losses["mi"] + 0.1 * full.aux_losses["z"])
    unweighted = MoLM(model_preset("tiny", aux_loss_weight=0.0))(ids, labels=ids, all_aux_losses=False)
    assert unweighted.aux_losses == {} and unweighted.aux_loss.item() == 0.0
