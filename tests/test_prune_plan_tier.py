"""Plan tiers: groups a family marks as fragile (EfficientNet blocks without a skip connection, and
the head conv the classifier reads) are cut only after every other group's chunks, so a target the
others can reach leaves them whole."""

from __future__ import annotations

import numpy as np
import torch
from test_prune_fixtures import make_model

from mpdeploy.families import get_family
from mpdeploy.families.efficientnet import SkiplessGroup
from mpdeploy.families.groups import ChannelGroup, ParamSlice
from mpdeploy.prune import PruneConfig, prune_model
from mpdeploy.prune.planner import plan_tier, rank_chunks


def _group(cls, name: str, width: int) -> ChannelGroup:
    return cls(
        name=name,
        kind="conv_inner",
        width=width,
        unit=1,
        producers=(ParamSlice(f"{name}.a.weight", 0),),
        consumers=(ParamSlice(f"{name}.b.weight", 1),),
        consumer_module=f"{name}.b",
    )


def test_higher_tier_chunks_come_after_every_lower_tier_chunk():
    plain, fragile = _group(ChannelGroup, "a", 32), _group(SkiplessGroup, "b", 32)
    assert (plan_tier(plain), plan_tier(fragile)) == (0, 1)
    # the fragile group's units score far lower per MAC: without its tier it would go first
    scores = {"a": np.arange(32, dtype=float) + 100.0, "b": np.arange(32, dtype=float) * 1e-3}
    macs = {"a": 1.0, "b": 1.0}
    ranked = rank_chunks([plain, fragile], scores, macs, round_to=8)
    assert [c.group for c in ranked] == ["a"] * 3 + ["b"] * 3
    untiered = rank_chunks([plain, _group(ChannelGroup, "b", 32)], scores, macs, round_to=8)
    assert [c.group for c in untiered] == ["b"] * 3 + ["a"] * 3
    # within the tier the order is still by score: the lowest-scored units of b go first
    assert ranked[3].units == tuple(range(8))


def test_efficientnet_blocks_without_skip_are_cut_last():
    model = make_model("mobilenetv3_small_050", {})
    groups = {g.name: g for g in get_family(model).channel_groups(model)}
    skipless = set()
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            name = f"blocks.{s}.{b}"
            if name in groups:
                assert isinstance(groups[name], SkiplessGroup) == (not block.has_skip), name
                if not block.has_skip:
                    skipless.add(name)
    assert {"blocks.1.0", "blocks.2.0", "blocks.4.0"} <= skipless
    # the head conv: the classifier reads its channels directly, no skip bypasses their cut
    assert plan_tier(groups["conv_head"]) == 1
    skipless.add("conv_head")
    assert plan_tier(groups["blocks.2.1"]) == 0 and plan_tier(groups["conv_stem"]) == 0
    calib = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))  # small: fast

    def cut(target):
        config = PruneConfig(target, method="magnitude", compensate="none")
        result = prune_model(model, calib, None, config)
        assert abs(result.headline["mac_reduction"] - target) <= 0.01
        return {g["name"] for g in result.plan["groups"] if g["width_after"] < g["width_before"]}

    shallow = cut(0.3)
    assert shallow and not shallow & skipless  # the others reach 30 % alone
    assert cut(0.75) & skipless  # a deeper target still reaches the skipless blocks
