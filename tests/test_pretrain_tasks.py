"""Pretraining task losses on a tiny features-mode model (no DeepSpeed): MRFR masking and learning."""
import torch

from pipeline.train.objectives import mask_regions, mrfr_loss
from test_models import FEATURES, feature_batch, tiny, text_batch


def test_mask_regions_picks_only_real_regions_and_at_least_one_per_row():
    region_mask = torch.arange(6)[None] < torch.tensor([1, 4, 6])[:, None]
    for seed in range(20):
        chosen = mask_regions(region_mask, 0.15, torch.Generator().manual_seed(seed))
        assert not (chosen & ~region_mask).any()
        assert chosen.any(dim=1).all()


def test_mrfr_regresses_the_masked_region_features():
    torch.manual_seed(0)
    model = tiny(**FEATURES).train()
    batch = {**text_batch([5, 7, 4, 6]), **feature_batch([3, 5, 2, 4])}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss = mrfr_loss(model, batch, 0.3, torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert model.mrfr_head.out.weight.grad.abs().sum() > 0
            # masked inputs are a learned vector, not zeros (a zero feature meets img_norm with zero variance
            # and its gradient explodes by 1/sqrt(eps))
            assert model.img_embeddings.mask_feature.grad.abs().sum() > 0
            assert model.img_embeddings.img_linear.bias.grad.norm() < 100
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5   # it fits the fixed batch
