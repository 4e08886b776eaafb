"""Preprocess's settings as data: interpolation, pixel scale, TensorFlow's crop, validation."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from velcro.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from velcro.data._preprocess import central_fraction_box
from velcro.errors import VelcroError

OLD_KEYS = ["resize", "crop", "mean", "std", "mode"]


def noise(height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return pixels, Image.fromarray(pixels)


def test_default_dict_keeps_the_old_keys_and_values():
    settings = Preprocess().to_dict()
    assert list(settings)[:5] == OLD_KEYS
    assert settings["resize"] == 256 and settings["crop"] == [224, 224]
    assert settings["mean"] == list(IMAGENET_MEAN) and settings["std"] == list(IMAGENET_STD)
    assert settings["mode"] == "RGB"
    assert (settings["interpolation"], settings["scale"], settings["crop_fraction"]) == (
        "bilinear", 255.0, None)


@pytest.mark.parametrize("preprocess", [
    Preprocess(),
    Preprocess(resize=None, crop=(4, 6), mean=(0.5,), std=(0.25,), mode="L"),
    Preprocess(resize=None, crop=224, crop_fraction=0.875, interpolation="bicubic", scale=1,
               mean=(127,) * 3, std=(128,) * 3),
    Preprocess(resize=None, crop=None),
])
def test_round_trip_through_json(preprocess):
    text = json.dumps(preprocess.to_dict())
    assert Preprocess.from_dict(json.loads(text)) == preprocess


def test_an_old_dict_reads_with_the_new_defaults():
    old = {"resize": 256, "crop": [224, 224], "mean": list(IMAGENET_MEAN),
           "std": list(IMAGENET_STD), "mode": "RGB"}
    assert Preprocess.from_dict(old) == Preprocess()


def test_square_crop_is_stored_as_an_int():
    assert Preprocess(crop=(224, 224)).crop == 224 and Preprocess(crop=[3, 5]).crop == (3, 5)
    assert Preprocess(mean=[0.5, 0.5, 0.5], std=[1, 1, 1]).mean == (0.5, 0.5, 0.5)


def test_scale_one_keeps_pixels_and_normalises_in_pixel_units():
    pixels, image = noise(5, 7)
    tensor = Preprocess(resize=None, crop=None, scale=1, mean=(127,) * 3, std=(128,) * 3)(image)
    expected = ((pixels.astype(np.float64) - 127) / 128).transpose(2, 0, 1)
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-7)


def test_interpolation_picks_pillows_filter():
    pixels, image = noise(40, 60)
    for name, pillow in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        tensor = Preprocess(resize=24, crop=None, interpolation=name, scale=1,
                            mean=(0,) * 3, std=(1,) * 3)(image)
        expected = np.asarray(image.resize((36, 24), pillow), dtype=np.float32)
        assert torch.equal(tensor, torch.from_numpy(expected.transpose(2, 0, 1).copy())), name


@pytest.mark.parametrize("width, height, fraction, box", [
    (227, 227, 0.875, (15, 15, 213, 213)),  # side int(198.625) = 198, offsets (29 + 1) // 2
    (300, 200, 0.875, (63, 13, 238, 188)),  # side 175, offsets 126 // 2, 26 // 2
    (10, 11, 1.0, (0, 1, 10, 11)),  # offsets round up: (11 - 10 + 1) // 2 = 1
    (3, 3, 0.1, (1, 1, 2, 2)),  # never less than a pixel
])
def test_central_fraction_box(width, height, fraction, box):
    assert central_fraction_box(width, height, fraction) == box


def test_crop_fraction_cuts_then_resizes():
    pixels, image = noise(30, 40)
    transform = Preprocess(resize=None, crop=(8, 12), crop_fraction=0.5, interpolation="bicubic",
                           scale=1, mean=(0,) * 3, std=(1,) * 3)
    side = 15  # half of the shorter side
    top, left = (30 - side + 1) // 2, (40 - side + 1) // 2
    window = Image.fromarray(pixels[top : top + side, left : left + side])
    expected = np.asarray(window.resize((12, 8), Image.BICUBIC), dtype=np.float32)
    assert torch.equal(transform(image), torch.from_numpy(expected.transpose(2, 0, 1).copy()))


@pytest.mark.parametrize("settings, fragment", [
    ({"interpolation": "lanczos"}, "interpolation 'lanczos' is unsupported"),
    ({"scale": 0}, "scale must be"),
    ({"scale": math.inf}, "scale must be"),
    ({"scale": math.nan}, "scale must be"),
    ({"scale": "255"}, "scale must be"),
    ({"scale": True}, "scale must be"),
    ({"mean": (127, 127, 127)}, "pixel range [0, 1]"),  # mean in pixels with scale 255
    ({"scale": 1, "mean": (-1, 0, 0), "std": (1, 1, 1)}, "pixel range [0, 255]"),
    ({"mean": (math.nan, 0, 0)}, "--mean values must be finite"),
    ({"std": (1, math.inf, 1)}, "--std values must be positive and finite"),
    ({"mean": "0.5"}, "--mean must be a list of numbers"),
    ({"std": (1, None, 1)}, "--std must be a list of numbers"),
    ({"resize": 0}, "--resize must be a size"),
    ({"resize": 100_000}, "--resize must be a size"),
    ({"resize": 2.5}, "--resize must be a size"),
    ({"crop": (224, 0)}, "--crop must be a size"),
    ({"crop": (1, 2, 3)}, "--crop must be a size or (height, width)"),
    ({"crop": True}, "--crop must be a size or (height, width)"),
    ({"resize": None, "crop_fraction": 0}, "crop_fraction must be"),
    ({"resize": None, "crop_fraction": 1.5}, "crop_fraction must be"),
    ({"crop_fraction": 0.875}, "needs a crop size and no resize"),
    ({"resize": None, "crop": None, "crop_fraction": 0.875}, "needs a crop size and no resize"),
    ({"mode": "CMYK"}, "image mode 'CMYK' is unsupported"),
])
def test_bad_settings_are_one_line_errors(settings, fragment):
    with pytest.raises(VelcroError) as exc:
        Preprocess(**settings)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_from_dict_refuses_unknown_settings_and_non_mappings():
    with pytest.raises(VelcroError, match="unknown preprocessing setting 'size'"):
        Preprocess.from_dict({"size": 224})
    with pytest.raises(VelcroError, match="must be a mapping"):
        Preprocess.from_dict([("resize", 256)])
    with pytest.raises(VelcroError, match="--crop must be a size"):
        Preprocess.from_dict({"crop": [224, -1]})
