"""The demo/benchmark model (tiny LLaMA) and the byte corpus: causality, configs, deterministic split."""

from __future__ import annotations

import pytest
import torch

from coap_lab.data import BatchSampler, CorpusError, load_corpus, validation_windows
from coap_lab.data.corpus import default_corpus_root, list_corpus_files
from coap_lab.models import LLAMA_CONFIGS, LlamaConfig, build_llama, demo_config

TINY = demo_config(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_seq_len=16)


def test_future_tokens_do_not_change_earlier_logits():
    model = build_llama(TINY, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=gen)
    for t in (0, 5, 14):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, TINY.vocab_size, changed[:, t + 1 :].shape, generator=gen)
        with torch.no_grad():
            a, b = model(ids), model(changed)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :]), "later logits must see the changed tokens"


def test_positions_matter_rotary():
    """Same token at two positions gives different logits (rotary encodes position)."""
    model = build_llama(TINY, seed=0).eval()
    ids = torch.tensor([[7, 3, 3, 3]])
    with torch.no_grad():
        out = model(ids)
    assert not torch.allclose(out[0, 2], out[0, 3])


def test_seeded_init_is_reproducible_and_loss_is_near_uniform():
    a, b = build_llama(TINY, seed=3), build_llama(TINY, seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    ids = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    loss = a.loss(ids).item()
    assert abs(loss - torch.log(torch.tensor(256.0)).item()) < 0.2


def test_tied_head_shares_the_embedding():
    model = build_llama(demo_config(tie_embeddings=True, num_layers=1), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = sum(p.numel() for p in build_llama(demo_config(num_layers=1), device="meta").parameters())
    assert untied - sum(p.numel() for p in model.parameters()) == 256 * 256


@pytest.mark.parametrize(
    ("size", "approx"), [("60m", 58e6), ("130m", 134e6), ("350m", 368e6), ("1b", 1.34e9), ("7b", 6.74e9)]
)
def test_paper_configs_on_meta(size, approx):
    model = build_llama(size, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert abs(n - approx) / approx < 0.03, n
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names


def test_bad_config_raises():
    with pytest.raises(ValueError, match="heads"):
        LlamaConfig(256, 30, 64, 1, 4)
    with pytest.raises(ValueError, match="unknown LLaMA size"):
        build_llama("3b", device="meta")
    assert LLAMA_CONFIGS["1b"].intermediate_size == 5461


def _write_corpus(root, n_files=40):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (root / f"doc{i:02d}.txt").write_text(f"file {i}\n" + "lorem ipsum dolor sit amet\n" * (5 + i))
    return root


def test_folder_split_is_deterministic_and_disjoint(tmp_path):
    root = _write_corpus(tmp_path / "c")
    a, b = load_corpus(root), load_corpus(root)
    assert a.sha256 == b.sha256 and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.num_files == 40 and 1 <= a.num_val_files < 40
    val_text = bytes(a.val.tolist()).decode()
    train_text = bytes(a.train.tolist()).decode()
    for i in range(40):
        marker = f"file {i}\n"
        assert (marker in val_text) != (marker in train_text), f"doc{i} must be in exactly one split"
    # a renamed-but-identical copy elsewhere gives the same split (depends on relative paths only)
    c = load_corpus(_write_corpus(tmp_path / "elsewhere"))
    assert c.sha256 == a.sha256


def test_single_file_split_keeps_the_tail_for_validation(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    c = load_corpus(f)
    assert c.val.numel() > 0 and bytes(c.val.tolist()).decode().endswith("line 999\n")
    assert abs(c.val.numel() / (c.train.numel() + c.val.numel()) - 0.05) < 0.01


def test_missing_and_empty_corpus_raise(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "empty")


def test_default_corpus_is_sorted_stdlib_python():
    root = default_corpus_root()
    files = list_corpus_files(root, (".py",))
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any("site-packages" in r for r in rel)
    a, b = load_corpus(max_bytes=300_000), load_corpus(max_bytes=300_000)
    assert a.sha256 == b.sha256 and a.val.numel() > 0


def test_batches_depend_only_on_the_seed(tmp_path):
    c = load_corpus(_write_corpus(tmp_path / "c"))
    s1, s2, s3 = (BatchSampler(c.train, 4, 16, seed=s) for s in (5, 5, 6))
    b1 = [s1.next() for _ in range(3)]
    assert all(torch.equal(x, s2.next()) for x in b1)
    assert not torch.equal(b1[0], s3.next())
    assert b1[0].shape == (4, 17) and b1[0].dtype == torch.long
    w = validation_windows(c.val, 16, 8)
    assert w.shape[1] == 17 and 1 <= w.shape[0] <= 8
