import torch

from pipeline.common import IGNORE_INDEX
from tests.conftest import tiny_model


def test_packed_conversations_do_not_see_each_other(tok):
    model = tiny_model(tok.get_vocab_size()).eval()
    V = tok.get_vocab_size()
    g = torch.Generator().manual_seed(0)
    a, b, b2 = (torch.randint(5, V, (n,), generator=g) for n in (7, 9, 9))
    row = lambda second: torch.cat([a, second])[None]  # noqa: E731
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    doc = torch.tensor([0] * 7 + [1] * 9)[None]
    with torch.no_grad():
        packed, changed = model(row(b), pos=pos, doc=doc), model(row(b2), pos=pos, doc=doc)
        alone_a, alone_b = model(a[None]), model(b[None])
    assert torch.equal(packed[:, :7], changed[:, :7])  # changing B leaves A's logits unchanged
    torch.testing.assert_close(packed[:, :7], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:], alone_b, rtol=1e-5, atol=1e-5)  # positions restart, no leak from A


def test_loss_scores_logits_at_t_against_labels_at_t_plus_1_only_where_trained(tok):
    model = tiny_model(tok.get_vocab_size())
    ids = torch.randint(5, tok.get_vocab_size(), (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    with torch.no_grad():
        loss_sum, n = model(ids, labels)
        logits = model(ids)
    # by hand: positions 5..10 predict tokens 6..11, the trained ones
    expected = torch.nn.functional.cross_entropy(logits[:, 5:11].reshape(-1, logits.shape[-1]),
                                                 ids[:, 6:12].reshape(-1), reduction="sum")
    assert int(n) == 12
    torch.testing.assert_close(loss_sum, expected)
    with torch.no_grad():
        empty, n0 = model(ids, torch.full_like(ids, IGNORE_INDEX))
    assert int(n0) == 0 and torch.isfinite(empty) and float(empty) == 0.0  # a fully masked batch is no NaN
