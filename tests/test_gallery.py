"""docs/make_gallery.py on cheap scenarios: the figure is written and the numbers in gallery.md are the ones
recomputed here from the Dataset."""
import re
import sys
from pathlib import Path

import numpy as np

import flowsim

sys.path.insert(0, str(Path(__file__).parents[1] / "docs"))
import make_gallery as gallery  # noqa: E402


def _number(markdown: str, label: str) -> float:
    return float(re.search(re.escape(f"- {label}: ") + r"(\S+)", markdown).group(1))


def test_gallery_numbers_come_from_the_dataset(tmp_path):
    gallery.main(["--only", "landscapes-xyzw", "eoss-mlp", "--steps", "100", "--out", str(tmp_path)])
    md = (tmp_path / "gallery.md").read_text()
    for name in ("landscapes-xyzw", "eoss-mlp"):
        assert (tmp_path / "gallery" / f"{name}.png").stat().st_size > 0
        assert f"![{name}](gallery/{name}.png)" in md

    ds = flowsim.run("landscapes-xyzw", tmp_path / "xyzw.zarr", steps=100, overwrite=True, progress=False)
    r = ds.sel(run="gd-0.42")
    s = r.sharpness.values[np.isfinite(r.sharpness.values)][-1]
    assert _number(md, "gd-0.42: final λ_max") == float(f"{s:.4g}")
    assert _number(md, "gd-0.42: final λ_max/(2/η)") == float(f"{s * 0.42 / 2:.4g}")

    ds = flowsim.run("eoss-mlp", tmp_path / "eoss.zarr", steps=100, overwrite=True, progress=False)
    r = ds.sel(run="sgd-0.8", step=ds.step >= 50)
    b = r.batch_sharpness.values * 0.8 / 2
    assert _number(md, "sgd-0.8: median batch sharpness·η/2 over the last 50%") == float(
        f"{np.median(b[np.isfinite(b)]):.4g}")
