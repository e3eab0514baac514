import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from kgmel_core.factory import EncoderIdentity, EncoderSpec, create_encoder, encoder_identity
from kgmel_core.retrieval import device
from kgmel_core.retrieval.encoders import OpenClipEncoder, SentenceTransformerTextEncoder, length_batches
from kgmel_core.retrieval.tiny_clip import TINY_CLIP_MODEL, train_tiny_clip
from storage import ArtifactStore
from storage.embedding_cache import EmbeddingCache


def test_minilm_loads_offline_in_a_fresh_process():
    code = (
        "from kgmel_core.retrieval.encoders import SentenceTransformerTextEncoder as S; e = S('minilm', device='cpu');"
        "v = e.encode_texts(['Barack Obama', 'a river'], progress=False); print(v.shape, round(float((v*v).sum()), 3))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(2, 384) 2.0"


def test_tiny_clip_checkpoint_loads_by_path_like_a_real_one(small_demo, tmp_path):
    images = sorted(str(p) for p in (small_demo / "kb" / "images").glob("*.png"))[:16]
    stats = train_tiny_clip([f"entity {i}" for i in range(16)], images, tmp_path / "tiny.pt", epochs=1, batch_size=8)
    assert stats["pairs"] == 16
    encoder = OpenClipEncoder(TINY_CLIP_MODEL, str(tmp_path / "tiny.pt"), batch_size=4, device="cpu")
    saved = torch.load(tmp_path / "tiny.pt", weights_only=False)["state_dict"]
    loaded = encoder.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # the weights are the trained ones
    texts, vectors = ["a", "b", "c", "d", "e"], encoder.encode_texts(["a", "b", "c", "d", "e"], progress=False)
    assert vectors.shape == (len(texts), 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    image_vectors = encoder.encode_images(images[:3], progress=False)
    assert image_vectors.shape == (3, 64)
    assert encoder.identity.startswith(f"open_clip:{TINY_CLIP_MODEL}:file:")
    shared = EncoderSpec("open_clip", "open_clip", TINY_CLIP_MODEL, str(tmp_path / "tiny.pt"), 4, "cpu", "fp32")
    assert encoder_identity(shared) == EncoderIdentity(encoder.identity, encoder.identity, shared=True)
    assert encoder_identity(shared).encoder == create_encoder(shared).identity


def test_composite_without_image_encoder_reports_no_image_dim(tmp_path):
    encoder = create_encoder(EncoderSpec("minilm", "none", "unused", None, 8, "cpu", "fp32"))
    assert encoder.image_dim is None and encoder.identity.endswith("|no-images")


def test_the_identity_known_without_loading_is_the_loaded_encoders():
    """The embed stage looks vectors up by `encoder_identity`; it must be what the loaded encoder says."""
    for precision in ("fp32", "bf16"):
        spec = EncoderSpec("minilm", "none", "unused", None, 8, "cpu", precision)
        loaded = create_encoder(spec)
        assert encoder_identity(spec) == EncoderIdentity(loaded.text.identity, None, shared=False)
        assert encoder_identity(spec).encoder == loaded.identity


def test_embedding_cache_encodes_only_missing(tmp_path):
    cache = EmbeddingCache(ArtifactStore(tmp_path), "enc-1", "text")
    calls = []

    def compute(rows):
        calls.append(list(rows))
        return np.array([[float(r), 1.0] for r in rows], dtype=np.float32)

    first, fresh = cache.get_or_compute(["a", "b"], [0, 1], compute)
    second, fresh2 = cache.get_or_compute(["b", "c", "a"], [1, 2, 0], compute)
    assert fresh == 2 and fresh2 == 1 and calls == [[0, 1], [2]]
    assert np.array_equal(second[0], first[1]) and np.array_equal(second[2], first[0])
    other = EmbeddingCache(ArtifactStore(tmp_path), "enc-2", "text")  # another encoder: nothing shared
    assert other.get_or_compute(["a"], [0], compute)[1] == 1


def test_bf16_text_vectors_are_close_to_fp32_and_cached_apart():
    texts = ["Barack Obama: 44th president of the United States", "Danube", "a river in central Europe", "Q42"]
    fp32 = create_encoder(EncoderSpec("minilm", "none", "unused", None, 8, "cpu", "fp32"))
    bf16 = create_encoder(EncoderSpec("minilm", "none", "unused", None, 8, "cpu", "bf16"))
    a, b = fp32.encode_texts(texts, progress=False), bf16.encode_texts(texts, progress=False)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    cosines = (a * b).sum(axis=1)
    assert cosines.min() > 0.995 and not np.array_equal(a, b)  # close, but really computed in bf16
    assert "bf16" not in fp32.identity  # fp32 identities as before: existing embedding caches stay valid
    assert bf16.identity == fp32.identity.replace("|no-images", ":bf16|no-images")
    assert fp32.encode_texts([], progress=False).shape == (0, 384)


def test_length_batches_grow_for_short_strings_and_cover_every_row_once():
    # batch_size 8: a budget of 8 * 64 = 512 word pieces, at most 8 * 2 = 16 strings.
    pieces = [4] * 10 + [102] * 8 + [52] * 9 + [4] * 10
    batches = length_batches(pieces, batch_size=8)
    assert [len(b) for b in batches] == [8, 9, 16, 4]  # 512 // 102 < 8: 8; 512 // 52 = 9; 512 // 4: capped
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(pieces)))
    assert [pieces[i] for i in rows] == sorted(pieces, reverse=True)  # longest first: little padding
    assert length_batches([], batch_size=4) == []
    assert [len(b) for b in length_batches([0, 0], batch_size=1)] == [2]  # no division by zero


def test_minilm_counts_word_pieces_not_characters():
    encoder = SentenceTransformerTextEncoder("minilm", device="cpu")
    texts = ["Q42", "antidisestablishmentarianism", "a b c d e f g h", "word " * 500]
    pieces = encoder.word_pieces(texts)
    # [CLS] and [SEP] around each; a long word splits into several pieces; the model cuts at max_seq_length
    assert pieces[0] == len(encoder.model.tokenizer("Q42")["input_ids"])
    assert pieces[2] == 10 and pieces[1] > 3
    assert pieces[3] == encoder.model.max_seq_length


def test_minilm_batches_strings_of_equal_word_pieces_together(monkeypatch):
    encoder = SentenceTransformerTextEncoder("minilm", batch_size=1, device="cpu")
    # sorted by characters (18, 15, 15, 13) each batch of two would pad: 18 characters are one piece
    texts = ["a b c d e f g h", "international", "q r s t u v w x", "telecommunications"]
    padding, preprocess = [], encoder.model.preprocess

    def recording(batch):
        features = preprocess(batch)
        padding.append(int((features["attention_mask"] == 0).sum()))
        return features

    monkeypatch.setattr(device, "CPU_LANES", 1)
    monkeypatch.setattr(encoder.model, "preprocess", recording)
    vectors = encoder.encode_texts(texts, progress=False)
    assert padding == [0, 0]
    assert np.allclose(vectors, np.concatenate([encoder.encode_texts([t], progress=False) for t in texts]), atol=1e-5)


def test_minilm_puts_each_vector_back_in_its_row_whatever_its_batch():
    texts = ["Danube", "Barack Obama: 44th president of the United States, born in Honolulu, Hawaii", "Q42",
             "a river in central Europe", "Obama"]
    encoder = create_encoder(EncoderSpec("minilm", "none", "unused", None, 2, "cpu", "fp32"))
    together = encoder.encode_texts(texts, progress=False)
    alone = np.concatenate([encoder.encode_texts([text], progress=False) for text in texts])
    assert np.allclose(together, alone, atol=1e-5)


def _thread_count_in_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_two_cpu_lanes_give_the_same_bits_and_leave_torch_threads_as_they_were(monkeypatch):
    texts = [f"{word} " * (1 + i % 13) + str(i) for i, word in enumerate(["river", "Obama", "Q42"] * 20)]
    encoder = create_encoder(EncoderSpec("minilm", "none", "unused", None, 4, "cpu", "fp32")).text
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two lanes of one thread each, also on a one-core runner
    try:
        two_lanes = encoder.encode_texts(texts, progress=False)
        assert torch.get_num_threads() == 2 and _thread_count_in_a_new_thread() == 2
        monkeypatch.setattr(device, "CPU_LANES", 1)
        one_lane = encoder.encode_texts(texts, progress=False)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(two_lanes, one_lane)


def test_an_error_in_one_lane_is_raised_and_torch_threads_restored(monkeypatch):
    encoder = create_encoder(EncoderSpec("minilm", "none", "unused", None, 1, "cpu", "fp32")).text
    calls, preprocess = [], encoder.model.preprocess

    def failing_preprocess(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise ValueError("tokenizer broke")
        return preprocess(batch)

    monkeypatch.setattr(encoder.model, "preprocess", failing_preprocess)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="tokenizer broke"):
            encoder.encode_texts([f"{i} " + "long text " * 30 for i in range(6)], progress=False)  # 6 batches
        assert torch.get_num_threads() == 2 and _thread_count_in_a_new_thread() == 2
    finally:
        torch.set_num_threads(before)
