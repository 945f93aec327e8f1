"""The README's first example runs as written: an 8-bit measurement of a held-out photograph
restored with the built-in prior at its defaults, beside the classical baseline it prints."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _snippet(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block is not None, heading
    return block.group(1)


def test_first_example_restores_an_8_bit_measurement_against_a_baseline(tmp_path, monkeypatch):
    from deqir_dist.data.photos import center_crop, to_tensor
    from deqir_dist.models.builtin import heldout_images
    code = _snippet("## Restore your own photo")
    assert "from_clean" not in code and "bits=8" in code and "baselines" in code
    photo = heldout_images()["chelsea"]                         # held out from the prior's training
    crop = center_crop(to_tensor(photo), 48)                     # 48 px: N = 100 in a few seconds
    u8 = ((crop + 1) * 127.5).round().clamp(0, 255).to(dtype=__import__("torch").uint8).permute(1, 2, 0).numpy()
    Image.fromarray(u8).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    m = re.fullmatch(r"restored (\d+\.\d+) dB, bicubic \+ back-projection (\d+\.\d+) dB, \d+ s\n", out.getvalue())
    assert m is not None, out.getvalue()
    restored, baseline = float(m.group(1)), float(m.group(2))
    assert 18 < baseline < 40 and 18 < restored < 40, out.getvalue()      # 8-bit numbers, not 50 dB float ones
    assert np.asarray(Image.open(tmp_path / "restored.png")).shape == (48, 48, 3)
    with Image.open(tmp_path / "photo_x4.png") as im:
        assert im.size == (12, 12) and im.mode == "RGB"                  # an 8-bit measurement
