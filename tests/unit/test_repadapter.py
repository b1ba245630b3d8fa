"""RepAdapter: reference layout, identity at init, exact merge, hook hygiene, zero inference cost."""
import copy

import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def ra(bridges):
    return bridges("repadapter")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=128, vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def randomised_adapters(ra, model, seed=2):
    """Adapters that are NOT the identity: conv_B (zero at init) and the biases get random values."""
    adapters = ra.build_adapters(model, ra.find_linear_targets(model), hidden_dim=8, groups=2, scale=0.5)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adapters.items():
            for p in (adapter.conv_B.weight, adapter.conv_B.bias, adapter.conv_A.bias):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return adapters.eval()


def last_hidden(model, input_ids):
    with torch.no_grad():
        return model(input_ids, output_hidden_states=True).hidden_states[-1]


def flops(model, input_ids):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids)
    return counter.get_total_flops()


def test_reference_shapes_and_identity_at_init(ra):
    torch.manual_seed(0)
    adapter = ra.RepAdapter(64)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes == {"conv_A.weight": (8, 64, 1), "conv_A.bias": (8,),
                      "conv_B.weight": (64, 4, 1), "conv_B.bias": (64,)}
    assert adapter.conv_A.weight.abs().sum() > 0  # xavier, not zero
    assert (adapter.groups, adapter.scale, adapter.dropout.p) == (2, 1.0, 0.1)
    x = torch.randn(3, 5, 64)
    assert torch.equal(adapter.eval()(x), x)


def test_forward_matches_reference_conv_layout(ra):
    """Token-last forward == the reference's Conv1d on (B, C, N)."""
    torch.manual_seed(0)
    adapter = ra.RepAdapter(12, hidden_dim=6, groups=3, scale=0.7).eval()
    nn.init.normal_(adapter.conv_B.weight)
    nn.init.normal_(adapter.conv_B.bias)
    x = torch.randn(2, 5, 12)
    reference = (adapter.conv_B(adapter.conv_A(x.transpose(1, 2))) * 0.7 + x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(adapter(x), reference)
    assert not torch.allclose(adapter(x), x)


def test_targets_and_state_dict_names(ra, llama):
    targets = ra.find_linear_targets(llama)
    assert len(targets) == 2 * 7 and "lm_head" not in targets
    assert "model.layers.0.self_attn.q_proj" in targets
    adapters = ra.build_adapters(llama, targets, hidden_dim=8, groups=2, scale=1.0, dropout=0.1)
    assert list(adapters) == targets
    keys = adapters.state_dict().keys()
    assert "model.layers.1.mlp.down_proj.conv_B.weight" in keys and len(keys) == 4 * len(targets)
    # down_proj reads the 128-wide intermediate activations.
    assert adapters["model.layers.1.mlp.down_proj"].conv_A.weight.shape == (8, 128, 1)
    # Round trip through the state dict into a fresh set.
    trained = randomised_adapters(ra, llama)
    fresh = ra.build_adapters(llama, targets, hidden_dim=8, groups=2, scale=0.5)
    fresh.load_state_dict(trained.state_dict())
    for (_, a), (_, b) in zip(trained.items(), fresh.items()):
        assert torch.equal(a.conv_B.weight, b.conv_B.weight)


def test_merged_equals_unmerged_and_differs_from_plain(ra, llama, input_ids):
    adapters = randomised_adapters(ra, llama)
    plain = last_hidden(llama, input_ids)
    with ra.attached(llama, adapters):
        unmerged = last_hidden(llama, input_ids)
    merged_model = ra.merge_into(copy.deepcopy(llama), adapters)
    merged = last_hidden(merged_model, input_ids)

    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert (unmerged - plain).abs().max() > 1e-2
    # The original model was not modified by attached() or by merging a copy.
    torch.testing.assert_close(last_hidden(llama, input_ids), plain, atol=0, rtol=0)


def test_fresh_adapters_change_nothing(ra, llama, input_ids):
    adapters = ra.build_adapters(llama, ra.find_linear_targets(llama)).eval()
    plain = last_hidden(llama, input_ids)
    with ra.attached(llama, adapters):
        torch.testing.assert_close(last_hidden(llama, input_ids), plain)


def test_merge_factors_single_linear(ra):
    torch.manual_seed(0)
    adapter = ra.RepAdapter(16, hidden_dim=4, groups=2, scale=2.0).eval()
    nn.init.normal_(adapter.conv_B.weight)
    nn.init.normal_(adapter.conv_B.bias)
    nn.init.normal_(adapter.conv_A.bias)
    for has_bias in (True, False):
        linear = nn.Linear(16, 10, bias=has_bias)
        up, down, bias_delta = ra.merge_factors(linear.weight, linear.bias, adapter)
        assert (up.shape, down.shape, bias_delta.shape) == ((10, 4), (4, 16), (10,))
        x = torch.randn(7, 16)
        expected = linear(adapter(x))
        base_bias = linear.bias if has_bias else 0
        torch.testing.assert_close(x @ (linear.weight + up @ down).T + base_bias + bias_delta, expected)


def test_attached_removes_hooks(ra, llama, input_ids):
    adapters = randomised_adapters(ra, llama)
    linears = [m for m in llama.modules() if isinstance(m, nn.Linear)]
    assert not any(m._forward_pre_hooks for m in linears)
    with ra.attached(llama, adapters):
        assert sum(bool(m._forward_pre_hooks) for m in linears) == len(adapters)
    assert not any(m._forward_pre_hooks for m in linears)

    with pytest.raises(RuntimeError, match="boom"), ra.attached(llama, adapters):
        raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in linears)


def test_merged_costs_exactly_the_plain_flops(ra, llama, input_ids):
    adapters = randomised_adapters(ra, llama)
    plain = flops(llama, input_ids)
    merged = flops(ra.merge_into(copy.deepcopy(llama), adapters), input_ids)
    with ra.attached(llama, adapters):
        unmerged = flops(llama, input_ids)
    assert plain > 0
    assert merged == plain
    assert unmerged > plain
