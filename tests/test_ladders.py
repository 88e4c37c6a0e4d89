"""The MoE-aware ladder never lowers a tensor: for every file type and keep type, each tensor of a ``-moe`` file
has at least the bits of the same tensor in the stock file (checked on the rule tables the quantizer verifies
every written tensor against)."""

from __future__ import annotations

import re

import pytest

from reamkit.quantization.inventory import inventory_from_config
from reamkit.quantization.ladders import ALWAYS_ACTIVE, ladder_overrides, nominal_bpw
from reamkit.quantization.rules import LADDER, choose_types
from reamkit.report.families import QWEN3_CODER_NEXT_REAM
from reamkit.zoo import FAMILIES, spec_for

KEEP = ("Q5_K", "Q6_K", "Q8_0")


def _inventories():
    yield "Qwen3-Coder-Next-REAM", inventory_from_config(QWEN3_CODER_NEXT_REAM.config)
    for family in FAMILIES:
        yield family, inventory_from_config(spec_for(family))


@pytest.mark.parametrize("keep", KEEP)
def test_moe_aware_files_never_have_fewer_bits_than_the_stock_file(keep):
    active = [re.compile(p) for p in ALWAYS_ACTIVE]
    checked = raised = 0
    for model, inv in _inventories():
        for ft in LADDER:
            stock = choose_types(inv.tensors, ft, inv.facts)
            moe = choose_types(inv.tensors, ft, inv.facts, overrides=ladder_overrides(
                "moe-aware", ft, keep, tensors=inv.tensors, facts=inv.facts))
            assert len(LADDER) == 11
            for t in inv.tensors:
                if stock[t.name] == t.type:          # not quantized (norms, routers): F32 in both
                    assert moe[t.name] == stock[t.name]
                    continue
                checked += 1
                lowered = nominal_bpw(moe[t.name]) < nominal_bpw(stock[t.name])
                assert not lowered, f"{model} {ft} keep {keep}: {t.name} {stock[t.name]} -> {moe[t.name]}"
                if any(rx.search(t.name) for rx in active):
                    # an always-active tensor gets at least the keep type, unless its shape forced a fallback
                    raised += moe[t.name] != stock[t.name]
                    assert nominal_bpw(moe[t.name]) >= min(nominal_bpw(keep), nominal_bpw(stock[t.name]))
    assert checked > 1000 and raised > 100
