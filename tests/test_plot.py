"""plot_genotype draws both cells of a genotype into a valid PNG, atomically."""
import os

import matplotlib.image as mpimg
import numpy as np
import pytest

from adarts_kernels.nas.genotypes import PUBLISHED, Genotype, to_dict
from adarts_kernels.nas.plot import plot_genotype

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    assert w > 400 and h > 200
    rgb = img[..., :3].reshape(-1, 3)
    assert float(np.ptp(rgb, axis=0).max()) > 0.5  # not all one colour
    q = (rgb * 255).astype(np.uint32)
    colours = np.unique(q[:, 0] << 16 | q[:, 1] << 8 | q[:, 2])
    assert len(colours) > 20  # really drawn: nodes, edges, text
    return img


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_plot_published_genotypes(tmp_path, name):
    path = str(tmp_path / f"{name}.png")
    assert plot_genotype(PUBLISHED[name], path, title=name) == path
    img = _check_png(path)
    assert img.shape[1] > img.shape[0]  # two cells side by side
    assert os.listdir(tmp_path) == [f"{name}.png"]  # no temporary file left behind


def test_plot_without_title_and_from_dict(tmp_path):
    path = str(tmp_path / "sub" / "cell.png")  # missing folder is created
    plot_genotype(to_dict(PUBLISHED["PC_DARTS"]), path)
    _check_png(path)


def test_plot_other_node_counts(tmp_path):
    g = Genotype(
        normal=[("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2), ("sep_conv_3x3", 0)],
        normal_concat=[2, 3],
        reduce=[("sep_conv_3x3", 0), ("dil_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
                ("skip_connect", 3), ("avg_pool_3x3", 1), ("sep_conv_5x5", 4), ("max_pool_3x3", 2),
                ("dil_conv_3x3", 5), ("skip_connect", 0), ("sep_conv_3x3", 6), ("sep_conv_3x3", 6)],
        reduce_concat=[2, 3, 4, 5, 6, 7],
    )
    _check_png(plot_genotype(g, str(tmp_path / "six.png")))
    tiny = Genotype(normal=[], normal_concat=[], reduce=[("skip_connect", 1)], reduce_concat=[2])
    _check_png(plot_genotype(tiny, str(tmp_path / "tiny.png"), title="tiny"))


def test_plot_rejects_missing_nodes(tmp_path):
    bad = Genotype(normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 7)], normal_concat=[2],
                   reduce=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1)], reduce_concat=[2])
    with pytest.raises(ValueError, match="normal"):
        plot_genotype(bad, str(tmp_path / "bad.png"))
    assert os.listdir(tmp_path) == []


def test_plot_failure_keeps_previous_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = str(tmp_path / "cell.png")
    plot_genotype(PUBLISHED["DARTS_V2"], path)
    before = open(path, "rb").read()

    def broken_savefig(self, fname, *a, **kw):
        fname.write(PNG_SIGNATURE + b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_genotype(PUBLISHED["PC_DARTS"], path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["cell.png"]
