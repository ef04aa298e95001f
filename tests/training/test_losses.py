import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import ArcFaceHead, BatchHardTripletLoss, CosFaceHead, MarginLoss, build_loss


def _head_with_weights(cls, weights, **kw):
    head = cls(weights.shape[1], weights.shape[0], **kw)
    with torch.no_grad():
        head.weight.copy_(weights)
    return head


def test_arcface_logits_match_hand_computation():
    # Embedding at 60 degrees from class 0 and 30 degrees from class 1 (2-D for hand arithmetic).
    emb = torch.tensor([[1.0, 0.0]])
    weights = torch.tensor(
        [
            [math.cos(math.radians(60)), math.sin(math.radians(60))],
            [math.cos(math.radians(30)), math.sin(math.radians(30))],
        ]
    )
    head = _head_with_weights(ArcFaceHead, weights, scale=10.0, margin=0.5)
    logits = head(emb, torch.tensor([0]))
    # target class 0: s * cos(60deg + 0.5 rad); other class: s * cos(30deg)
    expected = torch.tensor([[10 * math.cos(math.radians(60) + 0.5), 10 * math.cos(math.radians(30))]])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_arcface_falls_back_past_pi_minus_margin_and_keeps_gradients_finite():
    # theta = 170 degrees > pi - m (151.4 deg): target logit = s * (cos(theta) - m * sin(pi - m))
    theta = math.radians(170)
    emb = torch.tensor([[math.cos(theta), math.sin(theta)], [1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    head = _head_with_weights(ArcFaceHead, weights, scale=1.0, margin=0.5)
    logits = head(emb, torch.tensor([0, 0, 0]))
    assert logits[0, 0].item() == pytest.approx(math.cos(theta) - 0.5 * math.sin(math.pi - 0.5), abs=1e-6)
    # theta = 0 and theta = pi exactly: no NaN in the loss or its gradient
    loss = F.cross_entropy(logits, torch.tensor([0, 0, 0]))
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_arcface_matches_pytorch_metric_learning_with_degrees():
    from pytorch_metric_learning.losses import ArcFaceLoss

    torch.manual_seed(0)
    emb, labels = torch.randn(16, 8), torch.randint(0, 5, (16,))
    margin_rad, scale = 0.3, 16.0
    # pytorch-metric-learning takes the margin in DEGREES: convert, or the margin is 57x too small.
    reference = ArcFaceLoss(num_classes=5, embedding_size=8, margin=math.degrees(margin_rad), scale=scale)
    ours = MarginLoss(
        _head_with_weights(ArcFaceHead, reference.W.detach().T.clone(), scale=scale, margin=margin_rad)
    )
    torch.testing.assert_close(ours(emb, labels), reference(emb, labels), atol=1e-4, rtol=1e-4)


def test_cosface_logits_match_hand_computation():
    emb = torch.tensor([[3.0, 4.0]])  # normalised: (0.6, 0.8)
    weights = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    head = _head_with_weights(CosFaceHead, weights, scale=2.0, margin=0.35)
    logits = head(emb, torch.tensor([1]))
    torch.testing.assert_close(logits, torch.tensor([[2 * 0.6, 2 * (0.8 - 0.35)]]))


def test_batch_hard_triplet_uses_hardest_pairs():
    # Two classes in 2-D; anchor 0's hardest positive is at 90 deg (cos 0), hardest negative at 45 deg.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loss = BatchHardTripletLoss(margin=0.2)(emb, labels)
    # With cosine similarity the loss per anchor is relu(s_an - s_ap + margin):
    # a0: s_ap=0, s_an=max(0.707, 0)=0.707 -> 0.907; a1: s_ap=0, s_an=max(0.707,-1)=0.707 -> 0.907
    # a2: s_ap=cos(135)=-0.707, s_an=0.707 -> 1.614; a3: s_ap=-0.707, s_an=max(0,-1)=0 -> 0.907
    expected = (0.907107 * 3 + 1.614214) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_build_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("softmax", 8, 3, 30.0, 0.5)


@pytest.mark.parametrize("cls", [ArcFaceHead, CosFaceHead])
def test_set_margin_gives_the_head_built_with_that_margin(cls):
    torch.manual_seed(0)
    weights, emb, labels = torch.randn(5, 8), torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    built = _head_with_weights(cls, weights, scale=16.0, margin=0.3)
    changed = _head_with_weights(cls, weights, scale=16.0, margin=0.0)
    plain = changed(emb, labels)
    torch.testing.assert_close(plain, 16.0 * changed.cosine(emb), atol=1e-5, rtol=0)  # margin 0: no margin
    changed.set_margin(0.3)
    torch.testing.assert_close(changed(emb, labels), built(emb, labels), atol=1e-6, rtol=0)
    assert not torch.allclose(plain, built(emb, labels))
