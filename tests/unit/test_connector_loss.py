"""MUMU stage 1's length-invariant loss and the connector's masked forward (pure torch)."""
import torch

# ---- the loss and the masked forward ----------------------------------------------------------------------

def test_probe_attention_ignores_token_count_order_and_padding(bridges):
    t = bridges("training.losses")
    probes = t.make_probes(8, 16, seed=0)
    assert torch.all(probes[0] == 0) and probes[1:].abs().sum() > 0
    tokens = torch.randn(1, 5, 16)
    base = t.probe_attention(tokens, None, probes)
    shuffled = t.probe_attention(tokens[:, torch.randperm(5)], None, probes)
    padded = torch.cat([tokens, torch.randn(1, 3, 16) * 50], 1)
    valid = torch.arange(8)[None] < 5
    assert torch.allclose(base, shuffled, atol=1e-5)
    assert torch.allclose(base, t.probe_attention(padded, valid, probes), atol=1e-5)
    assert torch.allclose(base[:, 0], tokens.mean(1), atol=1e-6), "the zero probe reads the mean token"
    # a different token set answers differently
    assert (base - t.probe_attention(tokens + torch.randn(1, 5, 16), None, probes)).abs().max() > 0.1


def test_masked_connector_forward_equals_each_caption_alone(bridges):
    t, losses, mumu = bridges("training.tasks"), bridges("training.losses"), bridges("mumu")
    torch.manual_seed(0)
    connector = mumu.MUMUConnector(mumu.ConnectorConfig(in_dim=24, width=32, depth=2, heads=4, out_dim=40,
                                                        pooled_dim=12)).eval()
    lengths = [3, 7, 5]
    hidden = torch.zeros(3, 7, 24)
    for i, n in enumerate(lengths):
        hidden[i, :n] = torch.randn(n, 24)
    last = torch.tensor(lengths) - 1
    student = t.ConnectorStudent(connector, losses.make_probes(4, 40, 0))
    for training_mode in (True, False):  # train() and eval() take different kernels in torch
        student.train(training_mode)
        with torch.no_grad():
            tokens, pooled, valid = student(hidden, last)
        for i, n in enumerate(lengths):
            alone_tokens, alone_pooled = connector(hidden[i:i + 1, :n])
            assert torch.allclose(tokens[i, :n], alone_tokens[0], atol=1e-5)
            assert torch.allclose(pooled[i], alone_pooled[0], atol=1e-5)
        assert valid.sum(1).tolist() == lengths
