import numpy as np
import pytest
from PIL import Image

from brainrecon.data.natural import natural_images
from brainrecon.data.stimuli import find_images, letters, load_image, shapes


def test_artificial_sets():
    s, l = shapes(32), letters(32)
    assert len(s) == 40 and len(set(s.labels)) == 40 and s.images.shape == (40, 3, 32, 32)
    assert len(l) == 10 and [x[-1] for x in l.labels] == list("ACEINORSTU")
    assert l.images.min() < 0.1 and np.isclose(np.median(l.images), 0.5, atol=0.01)   # black letters on grey
    red = s.images[s.labels.index("square_red")]
    assert np.allclose(red[:, 16, 16], [1, 0, 0])


def test_natural_test_images_are_held_out():
    train, test = natural_images(40, 12, 32, seed=0)
    assert len(train) == 40 and len(test) == 12
    assert len({lab.split("_")[1] for lab in test.labels}) == 12    # one tile per picture first
    # no test image equals any training crop
    d = ((train.images[:, None] - test.images[None]) ** 2).mean(axis=(2, 3, 4))
    assert d.min() > 1e-4


def test_image_folder_lookup(tmp_path):
    Image.fromarray(np.zeros((10, 20), np.uint8)).save(tmp_path / "n01518878_5958.JPEG")
    Image.fromarray(np.zeros((5, 5, 4), np.uint8), "CMYK").save(tmp_path / "b.jpg")
    paths = find_images(tmp_path, ["n01518878_5958", "b"])
    assert load_image(paths["n01518878_5958"], 16).shape == (3, 16, 16)
    assert load_image(paths["b"], 8).shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match="c, d"):
        find_images(tmp_path, ["b", "c", "d"])
